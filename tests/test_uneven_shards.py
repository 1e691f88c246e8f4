"""Uneven shards: a parameter dim that does not divide the fsdp degree is padded, as FSDP2 does, not refused.

Rank i holds chunk i of torch.chunk (ceil(rows / n) rows, the last ranks fewer or none: 3 rows on
fsdp=4 are 1, 1, 1, 0). Every case compares, in float64 at 1e-10, the outputs, every gradient and the
parameters after AdamW steps (the optimizer sees only the real rows, an empty shard on some ranks)
with the unsplit model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from torch.distributed.fsdp import MixedPrecisionPolicy

from fxpar.core.spec import chunk_bounds
from fxpar.testing import rank_pool
from models import Chain, mse

RTOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() if b.numel() else 0.0


def _train(shape, names, widths, *, steps: int = 2, batch: int = 8, plan_kwargs=None, mp=None, **options) -> dict:
    """Trains Chain(widths) `steps` AdamW steps on the mesh and one process; the worst relative errors.

    plan_kwargs: a Plan's (pipelines); mp: (param_dtype, reduce_dtype) of a MixedPrecisionPolicy."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = Chain(widths).double()
    ref = copy.deepcopy(model)
    data = [(torch.randn(batch, widths[0], dtype=torch.float64), torch.randn(batch, widths[-1], dtype=torch.float64))
            for _ in range(steps)]
    if plan_kwargs is not None:
        options["plan"] = fxpar.Plan(**plan_kwargs)
    if mp is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=mp[0], reduce_dtype=mp[1])
    pm = fxpar.parallelize(model, mesh, example_inputs=(data[0][0],), **options)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    out = {"out": 0.0, "loss": 0.0, "grad": 0.0, "param": 0.0, "grad_names": set()}
    for x, t in data:
        with torch.no_grad():
            out["out"] = max(out["out"], _rel(pm(x), ref(x)))
        opt.zero_grad()
        loss = pm.step(x, target=t, loss_fn=mse)
        ref_opt.zero_grad()
        ref_loss = mse(ref(x), t)
        ref_loss.backward()
        out["loss"] = max(out["loss"], _rel(loss.detach(), ref_loss.detach()))
        grads = pm.full_grads()
        for k, p in ref.named_parameters():
            out["grad"] = max(out["grad"], _rel(grads[k], p.grad))
            out["grad_names"].add(k)
        opt.step()
        ref_opt.step()
    full = pm.full_state_dict()
    out["param"] = max(_rel(full[k], v) for k, v in ref.state_dict().items())
    out["local_shapes"] = {k: tuple(p.shape) for k, p in pm.graph_module.named_parameters()}
    out["dtypes"] = {p.dtype for p in pm.parameters()} | {p.grad.dtype for p in pm.parameters() if p.grad is not None}
    out["explain"] = pm.explain()
    out["ref_names"] = {k for k, _ in ref.named_parameters()}
    return out


def _assert_exact(results: list[dict], rtol: float = RTOL) -> None:
    for rank, r in enumerate(results):
        assert r["grad_names"] == r["ref_names"], rank
        for what in ("out", "loss", "grad", "param"):
            assert r[what] <= rtol, (rank, what, r[what])


def test_chunk_bounds_are_torch_chunks():
    for size in range(0, 13):
        for n in range(1, 6):
            want = [c.numel() for c in torch.arange(size).chunk(n)] if size else []
            want += [0] * (n - len(want))
            got = [chunk_bounds(size, n, i) for i in range(n)]
            assert [length for _, length in got] == want, (size, n)
            assert sum(length for _, length in got) == size
            assert all(s + length <= size for s, length in got)


@pytest.mark.parametrize("unit", ["block", "param"])
def test_fsdp2_uneven_rows(unit):
    # 7 and 5 rows on fsdp=2: chunks of 4 and 3, 3 and 2
    results = rank_pool(2).run(_train, (2,), ("fsdp",), [6, 7, 5, 4], fsdp_unit=unit)
    _assert_exact(results)
    assert results[0]["local_shapes"]["layers.0.weight"] == (4, 6)
    assert results[1]["local_shapes"]["layers.0.weight"] == (3, 6)
    assert "fsdp shards dim 0 unevenly: 7 rows in chunks of 4 over fsdp=2" in results[0]["explain"]


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fsdp4_fewer_rows_than_ranks(reshard):
    # layers.1 has 3 rows on 4 ranks: rank 3 holds an empty shard, and AdamW steps on it
    results = rank_pool(4).run(_train, (4,), ("fsdp",), [8, 7, 3], reshard_after_forward=reshard)
    _assert_exact(results)
    assert [r["local_shapes"]["layers.1.weight"] for r in results] == [(1, 7), (1, 7), (1, 7), (0, 7)]
    assert [r["local_shapes"]["layers.0.weight"] for r in results] == [(2, 8), (2, 8), (2, 8), (1, 8)]


def test_dp2_x_fsdp2_uneven():
    _assert_exact(rank_pool(4).run(_train, (2, 2), ("dp", "fsdp"), [6, 7, 5, 3]))


def test_fsdp2_x_tp2_uneven():
    # layers' tensor-parallel shards (10 / tp=2 = 5 rows) do not divide by fsdp=2
    results = rank_pool(4).run(_train, (2, 2), ("fsdp", "tp"), [6, 10, 6, 3])
    _assert_exact(results)


@pytest.mark.parametrize("schedule,reshard", [("gpipe", True), ("1f1b", False)], ids=["gpipe", "1f1b-gather-once"])
def test_fsdp2_x_pp2_uneven(schedule, reshard):
    results = rank_pool(4).run(_train, (2, 2), ("fsdp", "pp"), [6, 7, 5, 7, 3], reshard_after_forward=reshard,
                               plan_kwargs={"schedule": schedule, "microbatches": 2})
    _assert_exact(results)


def test_fsdp4_uneven_mixed_precision():
    # float32 compute and gathers of a float64 model, gradients reduced in float64: float32 rounding
    # of the unsplit float64 model, parameters and gradients float64 (FSDP2's meaning)
    results = rank_pool(4).run(_train, (4,), ("fsdp",), [8, 7, 3], mp=(torch.float32, torch.float64))
    _assert_exact(results, rtol=1e-5)
    assert all(r["dtypes"] == {torch.float64} for r in results)
    assert max(r["grad"] for r in results) > 1e-12  # the compute really is float32
