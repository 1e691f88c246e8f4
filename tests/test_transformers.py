"""Real transformer models, planned automatically: logits and every gradient equal to the original.

GPT-2 (fused qkv Conv1D, tied embeddings), Llama, Qwen2 (grouped-query
attention), BERT (tied decoder) from Hugging Face configs with random
weights, and a torchtitan-style Llama (complex rotary, GQA).
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpar
from fxpar.testing import rank_pool

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")

VOCAB = 128


def build(name: str) -> torch.nn.Module:
    T = transformers
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 vocab_size=VOCAB, max_position_embeddings=64)
    if name == "gpt2":
        model = tiny_gpt2(vocab_size=VOCAB)
    elif name == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(**small, num_key_value_heads=4, use_cache=False,
                                                 bos_token_id=0, eos_token_id=0))
    elif name == "qwen2":
        model = T.Qwen2ForCausalLM(T.Qwen2Config(**small, num_key_value_heads=2, use_cache=False,
                                                 bos_token_id=0, eos_token_id=0))
    elif name == "bert":
        model = T.BertForMaskedLM(T.BertConfig(**small))
    elif name == "titan":
        from models import TitanLlama

        model = TitanLlama(vocab=VOCAB, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=64)
    else:
        raise KeyError(name)
    return model.eval()  # dropout off: the comparison is exact


def logits_of(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def ce(out, target) -> torch.Tensor:
    logits = logits_of(out)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))


def _run(name: str) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    result = {}
    for dtype in (torch.float64, torch.float32):
        torch.manual_seed(0)
        model = build(name).to(dtype)
        ids, target = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
        fxpar.check(pm)
        report = fxpar.verify(model, pm, ids, target=target, loss_fn=ce)
        key = str(dtype).rsplit(".", 1)[1]
        result[key] = {"ok": report.ok, "report": str(report), "n": len(report.tensors)}
        if dtype == torch.float64:
            with fxpar.count_comms() as comms:
                pm.zero_grad()
                pm.step(ids, target=target, loss_fn=ce)
            result["comms"] = collections.Counter(f"{c.direction} {c.op}" for c in comms)
            result["fallbacks"] = pm.explain().split("Fallbacks (ops without a sharding rule, run replicated): ")[1][0]
            # One compiled module serves other batch sizes and sequence lengths without re-planning.
            errs = []
            for shape in [(3, 5), (1, 12)]:
                other = torch.randint(0, VOCAB, shape)
                with torch.no_grad():
                    got, want = logits_of(pm(other)), logits_of(model(other))
                errs.append(((got - want).abs().max() / want.abs().max()).item())
            result["dynamic_err"] = max(errs)
    return result


# forward all-reduces beyond 2 per block: the vocab-parallel embedding where tied to the lm_head.
# the token embedding is vocab parallel (tied or not): its lookup is all-reduced once
EMBED_ALLREDUCE = {"gpt2": 1, "bert": 1, "llama": 1, "qwen2": 1, "titan": 1}
KV_HEADS = {"gpt2": 4, "bert": 4, "llama": 4, "qwen2": 2, "titan": 2}


@pytest.mark.parametrize("tp", [2, pytest.param(4, marks=pytest.mark.slow)])  # tp=4 in CI's slow run
@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2", "bert", "titan"])
def test_automatic_plan_matches_original(name, tp):
    results = rank_pool(tp).run(_run, name, timeout=240)
    r = results[0]
    for rank, res in enumerate(results):
        for key in ("float64", "float32"):
            assert res[key]["ok"], f"rank {rank} {key}:\n{res[key]['report']}"
        assert res["dynamic_err"] < 1e-10, f"rank {rank}: other shapes off by {res['dynamic_err']}"
    assert r["fallbacks"] == "0"
    layers = 2
    comms = r["comms"]
    # Megatron: per block one all-reduce after attention and one after the MLP, forward; their duals
    # (the f ops on the block inputs) backward; plus the lm_head's f and its gathered logits.
    assert comms["forward all_reduce"] == 2 * layers + EMBED_ALLREDUCE[name], comms
    # fewer kv heads than tp: each rank holds its q heads' kv head (replicate_kv_heads), and the k and v
    # weight (and qwen2's bias) gradients are summed over the ranks sharing one: an all-reduce each per block
    kv_by_group = KV_HEADS[name] < tp and tp % KV_HEADS[name] == 0
    kv_tensors = 4 if name == "qwen2" else 2
    assert comms["backward all_reduce"] == 2 * layers + 1 + (kv_tensors * layers if kv_by_group else 0), comms
    assert comms["forward all_gather"] == 1, comms
    assert comms["backward all_gather"] == 0, comms
    assert sum(comms.values()) == (comms["forward all_reduce"] + comms["backward all_reduce"]
                                   + comms["forward all_gather"] + comms["backward all_gather"])


def _run_uneven() -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    T = transformers
    # 3 heads and an MLP of 48 on tp=2: the attention is cut by whole heads (2 + 1), the MLP evenly.
    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1,
                                             num_attention_heads=3, num_key_value_heads=3, vocab_size=VOCAB,
                                             max_position_embeddings=64, use_cache=False, bos_token_id=0,
                                             eos_token_id=0)).double().eval()
    ids, target = torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8))
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,))
    report = fxpar.verify(model, pm, ids, target=target, loss_fn=ce, rtol=1e-10, atol=1e-10)
    return {"ok": report.ok, "report": str(report), "explain": pm.explain()}


def test_heads_that_do_not_divide_are_cut_by_whole_heads_and_explain_says_how():
    r = rank_pool(2).run(_run_uneven)[0]
    assert r["ok"], r["report"]
    text = r["explain"]
    assert "self_attn.q_proj: colwise (uneven heads: 3 heads of 2+1 over tp=2)" in text
    assert "self_attn.o_proj: rowwise (uneven heads: 3 heads of 2+1 over tp=2)" in text
    assert "mlp.gate_proj: colwise" in text and "mlp.down_proj: rowwise" in text
