"""Communication volume equals the analytical Megatron figure, collective by collective.

The deterministic figures the benchmarks report (benchmarks/RESULTS.md), as
ordinary tests at small sizes: for GPT-2 and Llama (Hugging Face, from
configs) and the benchmarks' own GPT-2- and Llama-style models, a training
step on tp ranks sends exactly

    forward:  2 all-reduces of (B, T, D) per block (+1 for the vocab-parallel token embedding, tied or not)
              and 1 all-gather of the (B, T, V/tp) logit shard
    backward: 2 all-reduces of (B, T, D) per block + 1 for the output projection's input

(`benchmarks.models.megatron_tp_bytes`), a forward alone its forward part,
building the module sends nothing, and every sharded parameter holds exactly
1/tp of its tensor. A MoE model on ep runs exactly the all-to-alls its
collective schedule and explain() list for the `moe_experts` nodes, with their bytes.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the benchmarks package lives beside tests/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks.models import ModelConfig, build, megatron_tp_bytes  # noqa: E402

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")

B, T, VOCAB, LAYERS, DIM = 2, 8, 128, 2, 32


def _hf(name: str) -> torch.nn.Module:
    tf = transformers
    if name == "hf-gpt2":
        model = tiny_gpt2(LAYERS, DIM, vocab_size=VOCAB)
    else:
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=DIM, intermediate_size=64, num_hidden_layers=LAYERS,
                                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                                   max_position_embeddings=64, use_cache=False, bos_token_id=0,
                                                   eos_token_id=0))
    return model.eval()


def _config(name: str) -> ModelConfig:
    """The sizes the analytical formula needs, for every model here (kind decides the tied embedding)."""
    kind = "gpt2" if "gpt2" in name else "llama"
    return ModelConfig(kind, layers=LAYERS, dim=DIM, heads=4, kv_heads=4, hidden=64, vocab=VOCAB, batch=B, seq=T,
                       max_seq=64)


def _model(name: str) -> torch.nn.Module:
    return _hf(name) if name.startswith("hf-") else build(_config(name))


def _ce(out, target) -> torch.Tensor:
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _volume(name: str) -> dict:
    n = dist.get_world_size()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (n,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = _model(name)
    ids, target = torch.randint(0, VOCAB, (B, T)), torch.randint(0, VOCAB, (B, T))
    with fxpar.count_comms() as setup:
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False)
    with torch.no_grad():
        pm(ids)  # the first call exchanges the collective fingerprint; not part of a step
    with fxpar.count_comms() as train:
        pm.step(ids, target=target, loss_fn=_ce)
    with torch.no_grad(), fxpar.count_comms() as forward:
        pm(ids)
    shards = {}
    for fqn, p in pm.named_parameters():
        fqn = fqn.removeprefix("graph_module.")
        shards[fqn] = (p.numel(), model.get_parameter(fqn).numel())
    return {"setup": len(setup), "train": [(r.direction, r.op, r.nbytes) for r in train],
            "forward": [(r.direction, r.op, r.nbytes) for r in forward], "shards": shards}


MODELS = ["hf-gpt2", "hf-llama", "gpt2", "llama"]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("name", MODELS)
def test_bytes_per_step_equal_the_megatron_formula(name, tp):
    results = rank_pool(tp).run(_volume, name, timeout=240)
    cfg = _config(name)
    act, logits = B * T * DIM * 4, B * T * VOCAB // tp * 4
    tied = 1  # the token embedding is vocab parallel, tied (GPT-2) or not (Llama)
    for rank, r in enumerate(results):
        train = collections.Counter(r["train"])
        assert train == {("forward", "all_reduce", act): 2 * LAYERS + tied,
                         ("forward", "all_gather", logits): 1,
                         ("backward", "all_reduce", act): 2 * LAYERS + 1}, (rank, train)
        want = megatron_tp_bytes(cfg, tp, backward=True)
        assert sum(b for _, _, b in r["train"]) == want["all_reduce"] + want["all_gather"]
        assert len(r["train"]) == want["count"]
        forward = collections.Counter(r["forward"])
        assert forward == {("forward", "all_reduce", act): 2 * LAYERS + tied,
                           ("forward", "all_gather", logits): 1}, (rank, forward)
        want = megatron_tp_bytes(cfg, tp, backward=False)
        assert sum(b for _, _, b in r["forward"]) == want["all_reduce"] + want["all_gather"]

        assert r["setup"] == 0, f"rank {rank}: parallelize() communicated {r['setup']} times"
        sharded = {fqn for fqn, (local, full) in r["shards"].items() if local != full}
        for fqn, (local, full) in r["shards"].items():
            assert local == full or local * tp == full, (rank, fqn, local, full)
        # every attention and MLP weight of every block is sharded (Megatron)
        linear = {fqn for fqn in r["shards"] if fqn.endswith("weight") and r["shards"][fqn][1] >= DIM * DIM
                  and any(k in fqn for k in ("attn", "attention", "mlp", "feed_forward"))}
        assert len(linear) >= 4 * LAYERS and linear <= sharded, sorted(linear - sharded)


# --------------------------------------------------------------------------- MoE token exchange on ep (issue 17)


def _moe_volume(num_experts: int) -> dict:
    from fxpar.analysis.explain import moe_collectives
    from fxpar.analysis.fingerprint import collective_schedule
    from fxpar.ops.moe import moe_experts

    from tests.models import TitanMoEStack, mse

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    model = TitanMoEStack(num_experts=num_experts).double()
    x, y = torch.randn(4, 4, 16, dtype=torch.float64), torch.randn(4, 4, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    fxpar.check(pm)
    with torch.no_grad():
        pm(x)  # the fingerprint exchange
    with fxpar.count_comms() as train:
        pm.step(x, target=y, loss_fn=mse)
    nodes = [n for n in pm.graph_module.graph.nodes if n.target is moe_experts]
    static = [(c.note.split(" ")[0], c.forward_bytes, c.backward_bytes) for n in nodes for c in moe_collectives(n)]
    sched = [(s.direction, s.splits.split(":")[0]) for s in collective_schedule(pm.graph_module, pm.mesh_info)
             if s.op == "all_to_all"]
    return {"run": [(r.direction, r.nbytes) for r in train if r.op == "moe_all_to_all"], "static": static,
            "sched": sched, "explain": pm.explain()}


@pytest.mark.parametrize("num_experts", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_moe_all_to_all_bytes_equal_the_static_accounting(num_experts):
    """Every all-to-all the ep exchange runs is one the schedule lists, in its order, with the bytes
    explain() gives: exact for counts, the forward dispatch and the backward combine; the combine forward
    and dispatch backward vary with the routing, and summed over the group equal the dispatch."""
    results = rank_pool(2).run(_moe_volume, num_experts, timeout=240)
    layers, rows = 2, 4 * 4 // 2 * 2  # batch over ep, top-2
    for r in results:
        run = r["run"]
        assert [d for d, _ in run] == ["forward"] * 3 * layers + ["backward"] * 2 * layers
        assert [d for d, _ in r["sched"]] == [d for d, _ in run]  # one schedule entry per exchange run
        static = r["static"]
        assert [name for name, _, _ in static] == ["counts", "dispatch", "combine"] * layers
        fwd, bwd = run[:3 * layers], run[3 * layers:]
        for i in range(layers):
            (_, counts, _), (_, dispatch, dispatch_back), (_, combine, combine_back) = static[3 * i:3 * i + 3]
            assert fwd[3 * i][1] == counts == num_experts * 8
            assert fwd[3 * i + 1][1] == dispatch == rows * 16 * 8
            # the backward runs the last layer first, the combine's dual before the dispatch's
            assert bwd[2 * (layers - 1 - i)][1] == combine_back == dispatch
        assert f"fwd all_to_all x{3 * layers}" in r["explain"] and f"bwd all_to_all x{2 * layers}" in r["explain"]
        assert "(inside the node: dispatch): fwd all_to_all(ep, n=2)" in r["explain"]
    for i in range(layers):  # what the ranks received in the dispatch, they sent back in the combine
        combine = sum(r["run"][3 * i + 2][1] for r in results)
        dispatch = sum(r["run"][3 * i + 1][1] for r in results)
        back = sum(r["run"][3 * layers + 2 * (layers - 1 - i) + 1][1] for r in results)
        assert combine == dispatch == back == sum(r["static"][3 * i + 2][1] for r in results)
