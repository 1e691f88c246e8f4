"""explain()'s memory per rank next to what a training step really holds, counted from the tensors.

Predicted (`fxpar.analysis.memory.memory_per_rank`) against measured on gloo ranks:

- parameters, gradients and AdamW's state: exact (bytes of the local tensors after a step);
- the training step's peak (`RankMemory.step_peak`: saved activations, checkpoint recompute,
  parameter copies, FSDP's gathered parameters in flight, workspace, gradients) against the peak
  bytes of tensor storages alive at once during `pm.step` (`fxpar.testing.memory.LiveBytes`,
  deterministic, per rank): the prediction is an upper bound, at most 1.35 x the measured peak
  (measured 1.12 to 1.26 x on these configurations; it counts every gradient next to every saved
  activation, though the backward frees activations as gradients appear).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy

import fxpar
from fxpar.analysis.memory import memory_per_rank
from fxpar.testing import rank_pool
from fxpar.testing.memory import LiveBytes, tensor_bytes

from tests.models import tiny_gpt2

transformers = pytest.importorskip("transformers")

# predicted step peak <= TOLERANCE x measured (and >= measured: an upper bound). Measured ratios: fsdp2
# 1.21-1.29, tp2 1.12-1.39 (full checkpointing on tp rank 1 the highest, since LiveBytes stopped counting
# views of existing tensors as new memory), dp2 1.07.
TOLERANCE = 1.40
BF16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def ce(out, target):
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), target.reshape(-1))


PEAK_STEPS = 2
"""Steps measured per config; the least peak is compared. gloo's worker thread can hold a finished
collective's input and output past the step's last reference to them when it is preempted (measured in
2 to 5 of every 30-40 steps per rank, tests/test_overlap.py's PEAK_STEPS): a step's peak then counts
buffers the graph had freed."""

ACTIVATION_BOUND = dict(n_layer=4, n_embd=64, vocab_size=256, n_positions=128, batch=(8, 64))
# weights and their gradients outweigh the activations (the regime of benchmarks/dp.py's GPT-2 on dp=4)
GRADIENT_BOUND = dict(n_layer=2, n_embd=256, vocab_size=2048, n_positions=64, batch=(2, 16))


def _measure(shape, names, configs, sizes=ACTIVATION_BOUND) -> list[dict]:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    sizes = dict(sizes)
    batch = sizes.pop("batch")
    model = tiny_gpt2(**sizes)
    ids, target = torch.randint(0, sizes["vocab_size"], batch), torch.randint(0, sizes["vocab_size"], batch)
    out = []
    for ac, mp in configs:
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), activation_checkpointing=ac,
                               mp_policy=BF16 if mp else None)
        pm.step(ids, target=target, loss_fn=ce)  # first step: fingerprints, lazily built state
        peaks = []
        for _ in range(PEAK_STEPS):
            for p in pm.parameters():
                p.grad = None
            with LiveBytes() as mem:
                pm.step(ids, target=target, loss_fn=ce)
            peaks.append(mem.peak)
        opt = torch.optim.AdamW(pm.parameters())
        opt.step()
        (pred,) = memory_per_rank(pm)
        out.append({
            "config": (ac, mp), "peak": min(peaks), "pred": pred,
            "params": tensor_bytes(pm.parameters()),
            "grads": tensor_bytes(p.grad for p in pm.parameters() if p.grad is not None),
            "optimizer": tensor_bytes(v for s in opt.state.values() for k, v in s.items() if k != "step"),
            "explain": pm.explain(),
        })
    return out


def _check(results: list[dict]) -> None:
    for r in results:
        pred = r["pred"]
        assert (pred.parameters, pred.gradients, pred.optimizer) == (r["params"], r["grads"], r["optimizer"]), r
        assert r["peak"] <= pred.step_peak <= TOLERANCE * r["peak"], (r["config"], pred.step_peak, r["peak"])
        assert "training step: activations" in r["explain"]


@pytest.mark.parametrize("shape,names", [((2,), ("fsdp",)), pytest.param((2,), ("tp",), marks=pytest.mark.slow)],
                         ids=["fsdp2", "tp2"])
def test_step_peak_prediction_bounds_measured_peak(shape, names):
    results = rank_pool(2).run(_measure, shape, names, [(None, False), ("full", False), ("selective", False),
                                                         (None, True)], timeout=600)
    for r in results:
        _check(r)
    by = {r["config"]: r for r in results[0]}
    # checkpointing and bf16 compute really lower both the prediction and the measured peak
    for config in (("full", False), ("selective", False), (None, True)):
        assert by[config]["peak"] < by[(None, False)]["peak"]
        assert by[config]["pred"].step_peak < by[(None, False)]["pred"].step_peak
    assert by[("full", False)]["pred"].recompute > 0
    assert by[(None, True)]["pred"].parameters_by_dtype == (("float32", by[(None, True)]["params"]),)


@pytest.mark.parametrize("sizes", [ACTIVATION_BOUND, GRADIENT_BOUND], ids=["activation-bound", "gradient-bound"])
def test_step_peak_prediction_dp2(sizes):
    # the backward holds the local gradients and the flat all-reduce buckets at once (bucket_grad_sync);
    # a parameter's transposed view saved for the backward is no new memory (it was once counted as such,
    # and the GPT-2 of benchmarks/dp.py on dp=4 measured above its prediction)
    results = rank_pool(2).run(_measure, (2,), ("dp",), [(None, False), ("full", False)], sizes, timeout=600)
    for r in results:
        _check(r)
        # the bucketed all-reduce holds most gradients (the embeddings' stay graph all-reduces)
        assert all(0.5 * x["pred"].gradients < x["pred"].grad_buckets < x["pred"].gradients for x in r)


@pytest.mark.slow
def test_step_peak_prediction_dp2_tp2():
    for r in rank_pool(4).run(_measure, (2, 2), ("dp", "tp"), [(None, False), ("full", True)], timeout=600):
        _check(r)


def test_dry_run_shows_checkpointing_and_precision_in_memory():
    model = tiny_gpt2(n_layer=2, n_embd=32)
    ids = torch.randint(0, 128, (4, 32))
    base = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids,)).memory()[0]
    ac = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids,), activation_checkpointing="full").memory()[0]
    mp = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids,), mp_policy=BF16).memory()[0]
    keep = fxpar.plan(model, {"fsdp": 2}, example_inputs=(ids,), reshard_after_forward=False).memory()[0]
    assert ac.activations < base.activations and ac.recompute > 0 and base.recompute == 0
    assert mp.activations < base.activations and mp.gathered * 2 == base.gathered
    assert keep.gathered > base.gathered
    assert base.optimizer == 2 * base.gradients  # AdamW: 2 float32 states per element
