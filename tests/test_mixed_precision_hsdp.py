"""HSDP (dp x fsdp) under FSDP2's MixedPrecisionPolicy: both gradient reductions run in reduce_dtype.

FSDP2's HSDP reduce-scatters a gradient over fsdp in reduce_dtype (param_dtype where it is None), all-reduces
the shard over dp in that same dtype and casts the sum once into the shard's dtype. fxpar moves the dp sum
of an HSDP shard to the runtime (`bucket_grad_sync`, `fxpar.runtime.grad_sync`); it used to run in the
shard's dtype: float32 bytes where FSDP2 sends bfloat16 (reduce_dtype None or bfloat16), and bfloat16 where a
bfloat16 model asks for float32 reduction (whose reduce-scatter, too, ran in bfloat16).

Checked on dp2 x fsdp2 (4 gloo ranks): the dtype and bytes on the wire of every backward reduction, the
gradients against a float64 unsplit model (within bf16 compute's bound), and against torch's own HSDP
(`fully_shard` on the same 2-D mesh and policy) to float rounding of the reductions' order.
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.core.fmt import fmt_bytes
from fxpar.core.spec import get_info
from fxpar.testing import rank_pool
from models import BlockStack, mse

BF16, F32, F64 = torch.bfloat16, torch.float32, torch.float64
DEPTH, DIM, HIDDEN, BATCH = 2, 32, 128, 16
NUMEL = DEPTH * (2 * DIM * HIDDEN + HIDDEN + 3 * DIM)  # parameters of the model (norm, up, down)
# bf16 compute against a float64 model: the worst parameter's gradient, relative to its largest entry.
# Measured 6.4e-3 (float32 reduction) to 9.4e-3 (bfloat16 reduction) on this model; bf16's unit roundoff is
# 3.9e-3 and a 2-block forward and backward compounds a few of them.
BF16_BOUND = 2e-2
# bfloat16 shards, float32 reduce_dtype, each shard gathered on its own (fsdp_unit="param"): autograd hands
# the reduce-scatter's float32 result to the shard's gradient hook cast to bfloat16 (a gradient has its
# parameter's dtype), so the dp sum adds two rounded halves where FSDP2 rounds once: within 2 bf16 ulps of
# the largest entry (measured 7.6e-3; 2**-7 is one ulp there).
ONE_ROUNDING = 2 ** -6


def _policy(param_dtype, reduce_dtype):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def _data(dtype, ref=False):
    """The batch in the model's dtype (`ref`: those values in float64)."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(BATCH, DIM, generator=g).to(dtype), torch.randn(BATCH, DIM, generator=g).to(dtype)
    return (x.to(F64), y.to(F64)) if ref else (x, y)


def _fxpar_step(mesh, model, policy, fsdp_unit) -> dict:
    x, y = _data(next(model.parameters()).dtype)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), mp_policy=policy, fsdp_unit=fsdp_unit)
    with fxpar.count_comms() as comms:
        pm.step(x, target=y, loss_fn=mse)
    wire = collections.defaultdict(lambda: [set(), 0])
    for c in comms:
        if c.direction == "backward" and c.op in ("reduce_scatter", "all_reduce"):
            wire[f"{c.op} {c.mesh_dim}"][0].add(c.dtype)
            wire[f"{c.op} {c.mesh_dim}"][1] += c.nbytes
    sync_dtypes = {get_info(n).grad_sync.dtype for n in pm.graph_module.graph.nodes
                   if n.op == "get_attr" and get_info(n) is not None and get_info(n).grad_sync}
    return {"wire": dict(wire), "grads": pm.full_grads(), "sync_dtypes": sync_dtypes,
            "grad_dtypes": {p.grad.dtype for p in pm.parameters()}, "explain": pm.explain()}


def _torch_hsdp_grads(mesh, model, policy) -> dict:
    """torch's HSDP: fully_shard per block and at the root on the (dp, fsdp) mesh, each rank its batch shard."""
    from torch.distributed.fsdp import fully_shard

    x, y = _data(next(model.parameters()).dtype)
    n, rank = dist.get_world_size(), dist.get_rank()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    model.set_force_sum_reduction_for_comms(True)  # gloo has no ReduceOp.AVG: sum, then divide by dp x fsdp
    b = BATCH // n
    mse(model(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b]).backward()
    out = {}
    for k, p in model.named_parameters():  # Shard(0) over fsdp, Replicate over dp: ranks 0, 1 hold the halves
        parts = [torch.empty_like(p.grad.to_local()) for _ in range(n)]
        dist.all_gather(parts, p.grad.to_local().contiguous())
        out[k] = torch.cat(parts[:2])
    return out


def _case(model_dtype, param_dtype, reduce_dtype, fsdp_unit, with_torch=True) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fsdp"))
    model = BlockStack(DEPTH, DIM, HIDDEN, seed=0).to(model_dtype)
    out = _fxpar_step(mesh, copy.deepcopy(model), _policy(param_dtype, reduce_dtype), fsdp_unit)
    ref = copy.deepcopy(model).to(F64)
    x, y = _data(model_dtype, ref=True)
    mse(ref(x), y).backward()
    out["ref"] = {k: p.grad for k, p in ref.named_parameters()}
    if with_torch:
        out["torch"] = _torch_hsdp_grads(mesh, copy.deepcopy(model), _policy(param_dtype, reduce_dtype))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.to(F64) - b.to(F64)).abs().max() / b.to(F64).abs().max()).item()


# (model dtype, param_dtype, reduce_dtype) -> the dtype both reductions run in, as FSDP2's
CASES = {
    "fp32_bf16_fp32": (F32, BF16, F32, F32),
    "fp32_bf16_none": (F32, BF16, None, BF16),  # FSDP2: no reduce_dtype reduces in param_dtype
    "fp32_bf16_bf16": (F32, BF16, BF16, BF16),
    "bf16_bf16_fp32": (BF16, BF16, F32, F32),  # parameters already in param_dtype: still reduced in float32
}


SLOW = {("fp32_bf16_bf16", "block"), ("fp32_bf16_bf16", "param"), ("fp32_bf16_fp32", "param")}  # same paths


@pytest.mark.parametrize("case,fsdp_unit", [
    pytest.param(c, u, marks=[pytest.mark.slow] if (c, u) in SLOW else []) for c in CASES for u in ("block", "param")])
def test_hsdp_reduces_in_reduce_dtype_on_both_dims_like_fsdp2(case, fsdp_unit):
    model_dtype, param_dtype, reduce_dtype, wire_dtype = CASES[case]
    results = rank_pool(4).run(_case, model_dtype, param_dtype, reduce_dtype, fsdp_unit, True, timeout=180)
    shard_numel = NUMEL // 2  # fsdp=2
    for rank, r in enumerate(results):
        wire = r["wire"]
        # every reduction of a gradient in one dtype: FSDP2's reduce dtype, on both dims
        assert wire["reduce_scatter fsdp"][0] == {wire_dtype}, (rank, case, wire)
        assert wire["all_reduce dp"][0] == {wire_dtype}, (rank, case, wire)
        # the full gradient over fsdp, the shard's over dp, at the reduce dtype's width
        assert wire["reduce_scatter fsdp"][1] == NUMEL * wire_dtype.itemsize, (rank, case, wire)
        assert wire["all_reduce dp"][1] == shard_numel * wire_dtype.itemsize, (rank, case, wire)
        assert r["sync_dtypes"] == {None if wire_dtype == model_dtype else wire_dtype}, r["sync_dtypes"]
        # explain() and the memory model count the dp all-reduce at those bytes
        assert f"{fmt_bytes(shard_numel * wire_dtype.itemsize)} per step over dp" in r["explain"], r["explain"]
        # the sum lands in the parameters' (shards') dtype
        assert r["grad_dtypes"] == {model_dtype}, r["grad_dtypes"]
        for k, g in r["grads"].items():
            assert g.dtype == model_dtype, (k, g.dtype)
            err = _rel(g, r["ref"][k])
            assert err < BF16_BOUND, (rank, case, k, err)  # bf16 compute against the float64 model
            # torch's HSDP on the same mesh and policy: the same bf16 compute, the same reductions in the
            # same dtypes (sum, then the mean's power-of-two division: exact either way round)
            if (case, fsdp_unit) == ("bf16_bf16_fp32", "param"):
                assert _rel(g, r["torch"][k]) <= ONE_ROUNDING, (rank, k, _rel(g, r["torch"][k]))
            else:
                assert torch.equal(g, r["torch"][k]), (rank, case, k, _rel(g, r["torch"][k]))
