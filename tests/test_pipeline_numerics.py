"""Pipelined training on real gloo ranks: loss, every gradient and trained parameters equal the unsplit model.

GPT-2 and Llama (transformers, tiny configs, tied embedding / lm_head) run on
pp = 2 and 4 with every schedule fxpar maps to torch.distributed.pipelining;
pp x tp composes on 4 ranks. Every schedule of one model reuses one capture
(`_capture_once`: each parallelize gets a deep copy of what capture returned
for that model, which is what capture would return again), so the matrix
costs one torch.export per model and rank.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

import fxpar
import fxpar.compiler.compile
from fxpar.testing import rank_pool

from tests.models import BlockStack, tiny_gpt2

transformers = pytest.importorskip("transformers")

SCHEDULES = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "interleaved_zb", "zbv", "dualpipev"]
F64_RTOL = 1e-10


# --------------------------------------------------------------------------- models (built in the ranks)


def _gpt2(layers: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return tiny_gpt2(layers, vocab_size=96, n_positions=32, dtype=dtype, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)


def _llama(layers: int, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
                                   max_position_embeddings=32, tie_word_embeddings=True, use_cache=False,
                                   attn_implementation="sdpa", bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


MODELS = {"gpt2": _gpt2, "llama": _llama}
MEGATRON = {"blocks.*.up": "colwise", "blocks.*.down": "rowwise"}


def _ce(out, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _ce_sum(out, target: torch.Tensor) -> torch.Tensor:
    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")


def _mse_sum(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum()


@contextlib.contextmanager
def _capture_once():
    """parallelize() captures each model once per rank; later calls get a deep copy of that capture."""
    real = fxpar.compiler.compile.capture
    cache: dict[int, torch.fx.GraphModule] = {}

    def cached(model, args=(), kwargs=None, **kw):
        if id(model) not in cache:
            cache[id(model)] = real(model, args, kwargs, **kw)
        return copy.deepcopy(cache[id(model)])

    fxpar.compiler.compile.capture = cached
    try:
        yield
    finally:
        fxpar.compiler.compile.capture = real


def _worst(report) -> float:
    return max((t.max_rel for t in report.tensors if t.name == "loss" or t.name.startswith("grad ")), default=0.0)


def _train(model: nn.Module, pm, ids, target, steps: int) -> dict:
    """`steps` SGD steps (momentum, weight decay) on both; the largest relative parameter difference after."""
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        losses.append(float(pm.step(ids, target=target, loss_fn=_ce)))
        opt.step()
        ref_opt.zero_grad()
        _ce(ref(ids), target).backward()
        ref_opt.step()
    full = pm.full_state_dict()
    want = dict(ref.named_parameters(remove_duplicate=False))
    drift = max(float((full[k] - p.detach()).abs().max() / p.detach().abs().max()) for k, p in want.items())
    # Every rank's own copy of a tied weight moved exactly like the original.
    tied = {}
    for fqn, _ in pm.split.tied:
        for stage in pm.stage_modules:
            try:
                local = stage.get_parameter(fqn)
            except AttributeError:
                continue
            tied[fqn] = float((local - want[fqn]).detach().abs().max() / want[fqn].detach().abs().max())
    return {"drift": drift, "tied_drift": tied, "losses": losses,
            "missing": sorted(set(want) - set(full))}


def _accumulate(model: nn.Module, pm, ids, target) -> float:
    """Two steps without zero_grad accumulate like two backward() calls (tied gradients summed once)."""
    ref = copy.deepcopy(model)
    pm.zero_grad(set_to_none=True)
    for _ in range(2):
        pm.step(ids, target=target, loss_fn=_ce)
        _ce(ref(ids), target).backward()
    got = pm.full_grads()
    worst = max(float((got[k] - p.grad).abs().max() / p.grad.abs().max())
                for k, p in ref.named_parameters(remove_duplicate=False))
    pm.zero_grad(set_to_none=True)
    return worst


def _schedule_matrix(name: str, layers: int, schedules: list[str], dtype: torch.dtype, train: str | None) -> dict:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    model = MODELS[name](layers, dtype)
    torch.manual_seed(1)
    batch = 4 * world  # microbatches of two
    ids, target = torch.randint(0, 96, (batch, 6)), torch.randint(0, 96, (batch, 6))
    out = {}
    with _capture_once():
        for i, schedule in enumerate(schedules):
            plan = fxpar.Plan(schedule=schedule, microbatches=2 * world)
            # The passes before split_stages do the same for every schedule: check their graphs once.
            pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan, check=None if i == 0 else False)
            if i:
                fxpar.check(pm)
            report = fxpar.verify(model, pm, ids, target=target, loss_fn=_ce)
            r = {"ok": report.ok, "report": str(report), "worst": _worst(report),
                 "names": sorted(t.name for t in report.tensors), "tied": pm.split.tied,
                 "stages": pm.split.num_stages, "local": pm.split.local_stages}
            if schedule == train:
                r["accumulate"] = _accumulate(model, pm, ids, target)
                r["train"] = _train(model, pm, ids, target, steps=5)
                r["explain"] = pm.explain()
            out[schedule] = r
    return out


def _check_matrix(results: list[dict], name: str, dtype: torch.dtype, train: str | None) -> None:
    tied_names = {"gpt2": {"grad transformer.wte.weight", "grad lm_head.weight"},
                  "llama": {"grad model.embed_tokens.weight", "grad lm_head.weight"}}[name]
    for rank, by_schedule in enumerate(results):
        for schedule, r in by_schedule.items():
            where = f"rank {rank} {schedule}"
            assert r["ok"], f"{where}:\n{r['report']}"
            assert tied_names <= set(r["names"]), f"{where}: tied gradients not compared"
            assert r["tied"], f"{where}: the tied embedding / lm_head is not listed as tied"
            if dtype == torch.float64:
                assert r["worst"] <= F64_RTOL, f"{where}: worst relative error {r['worst']:.2e}"
            if schedule == train:
                t = r["train"]
                assert not t["missing"], f"{where}: full_state_dict lacks {t['missing']}"
                tol = F64_RTOL if dtype == torch.float64 else 1e-4
                assert t["drift"] <= tol, f"{where}: parameters after 5 steps off by {t['drift']:.2e}"
                assert all(d <= tol for d in t["tied_drift"].values()), f"{where}: {t['tied_drift']}"
                assert t["losses"][-1] < t["losses"][0]
                assert r["accumulate"] <= (F64_RTOL if dtype == torch.float64 else 1e-5), where
    # The loss is returned on every rank and all ranks agree on the split.
    for schedule in results[0]:
        assert len({tuple(r[schedule]["names"]) for r in results}) == 1


@pytest.mark.parametrize("name", ["gpt2", "llama"])
@pytest.mark.parametrize("pp", [2, pytest.param(4, marks=pytest.mark.slow)])  # pp=4 in CI's slow run
def test_every_schedule_matches_unsplit_model_float64(name, pp):
    # pp=4 with two stages per rank needs eight blocks.
    layers = 4 if pp == 2 else 8
    train = "interleaved_1f1b" if pp == 2 else "zbv"
    results = rank_pool(pp).run(_schedule_matrix, name, layers, SCHEDULES, torch.float64, train, timeout=300)
    _check_matrix(results, name, torch.float64, train)
    text = results[0][train]["explain"]
    assert f"Pipeline: {2 * pp} stages on pp={pp} (2 per rank)" in text
    assert "cut 0->1 before" in text and "of activations per step" in text
    assert "expected bubble fraction" in text and "tied weight 'lm_head.weight'" in text


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_float32_schedules_match_unsplit_model(name):
    results = rank_pool(2).run(_schedule_matrix, name, 4, ["1f1b", "zbv"], torch.float32, "1f1b", timeout=300)
    _check_matrix(results, name, torch.float32, "1f1b")


# --------------------------------------------------------------------------- pp x tp


def _pp_tp(name: str, schedule: str, dtype: torch.dtype = torch.float64) -> dict:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "tp"))
    torch.manual_seed(1)
    if name == "stack":
        model = BlockStack(depth=4, dim=16, hidden=32, seed=0).double()
        x, target = torch.randn(8, 5, 16, dtype=torch.float64), torch.randn(8, 5, 16, dtype=torch.float64)
        plan = fxpar.Plan(MEGATRON, schedule=schedule, microbatches=4)
        loss_fn = _mse_sum
        reduction = "sum"
    else:
        model = MODELS[name](4, dtype)
        x, target = torch.randint(0, 96, (8, 6)), torch.randint(0, 96, (8, 6))
        plan = fxpar.Plan(schedule=schedule, microbatches=4, auto_tp=True)
        loss_fn = _ce
        reduction = "mean"
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=target, loss_fn=loss_fn, loss_reduction=reduction)
    sharded = [n for n, p in pm.named_parameters()
               if p.numel() < model.get_parameter(n.split(".", 2)[2]).numel()]
    return {"ok": report.ok, "report": str(report), "worst": _worst(report), "sharded": sharded,
            "local": pm.split.local_stages}


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved_1f1b"])
def test_pp2_tp2_mlp_stack_sum_loss(schedule):
    results = rank_pool(4).run(_pp_tp, "stack", schedule, timeout=300)
    for rank, r in enumerate(results):
        assert r["ok"] and r["worst"] <= F64_RTOL, f"rank {rank}:\n{r['report']}"
        assert r["sharded"], f"rank {rank}: no tensor-parallel shards in its stages"
    # mesh (pp, tp): ranks 0, 1 run the first stage(s), ranks 2, 3 the last.
    assert [r["local"][0] for r in results] == [0, 0, 1, 1]


# Llama's RMSNorm computes in float32 even in a float64 model, so with tensor parallelism (partial sums
# reduced in another order) it agrees to float32 rounding only: it runs in float32, GPT-2 in float64.
@pytest.mark.parametrize("name, dtype", [("gpt2", torch.float64), ("llama", torch.float32)], ids=["gpt2", "llama"])
def test_pp2_tp2_transformers(name, dtype):
    results = rank_pool(4).run(_pp_tp, name, "1f1b", dtype, timeout=300)
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank}:\n{r['report']}"
        if dtype == torch.float64:
            assert r["worst"] <= F64_RTOL, f"rank {rank}:\n{r['report']}"
        assert r["sharded"], f"rank {rank}: tensor parallelism sharded nothing"


# --------------------------------------------------------------------------- losses and bad input


def _sum_loss_and_bad_batches(schedule: str) -> dict:
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
    model = BlockStack(depth=4, dim=16, hidden=32, seed=0).double()
    torch.manual_seed(1)
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=fxpar.Plan(schedule=schedule, microbatches=4))
    report = fxpar.verify(model, pm, x, target=target, loss_fn=_mse_sum, loss_reduction="sum")
    # Another batch size that still divides: stages for the new shapes are built on demand.
    x12, t12 = torch.randn(12, 16, dtype=torch.float64), torch.randn(12, 16, dtype=torch.float64)
    report12 = fxpar.verify(model, pm, x12, target=t12, loss_fn=_mse_sum, loss_reduction="sum")
    errors = {}
    for what, call in {
        "step": lambda: pm.step(torch.randn(6, 16, dtype=torch.float64), target=torch.randn(6, 16, dtype=torch.float64),
                                loss_fn=_mse_sum),
        "forward": lambda: pm(torch.randn(6, 16, dtype=torch.float64)),
        "target": lambda: pm.step(x, target=torch.randn(6, 16, dtype=torch.float64), loss_fn=_mse_sum),
        "reduction": lambda: pm.step(x, target=target, loss_fn=_mse_sum, loss_reduction="max"),
    }.items():
        try:
            call()
            errors[what] = None
        except fxpar.FxparError as e:
            errors[what] = (type(e).__name__, str(e))
    # The module still trains after rejected inputs.
    after = fxpar.verify(model, pm, x, target=target, loss_fn=_mse_sum, loss_reduction="sum")
    return {"ok": report.ok and report12.ok and after.ok,
            "report": "\n".join(map(str, (report, report12, after))),
            "worst": max(_worst(report), _worst(report12)), "errors": errors}


@pytest.mark.parametrize("schedule", ["gpipe", "interleaved_1f1b"])
def test_sum_loss_and_batches_that_do_not_split(schedule):
    results = rank_pool(2).run(_sum_loss_and_bad_batches, schedule, timeout=300)
    for rank, r in enumerate(results):
        assert r["ok"] and r["worst"] <= F64_RTOL, f"rank {rank}:\n{r['report']}"
        e = r["errors"]
        assert e["step"][0] == "ScheduleError" and "batch size 6" in e["step"][1] \
            and "4 equal microbatches" in e["step"][1] and "microbatches=" in e["step"][1], e["step"]
        assert e["forward"][0] == "ScheduleError" and "batch size 6" in e["forward"][1]
        assert e["target"][0] == "ScheduleError" and "target has batch size 6" in e["target"][1]
        assert e["reduction"][0] == "PlanError" and "'mean' or 'sum'" in e["reduction"][1]
