"""Plain data parallel under FSDP2's MixedPrecisionPolicy: gradients are all-reduced in reduce_dtype.

torch's `replicate` (FSDP2 on a replicated mesh) sums a gradient over dp in reduce_dtype, or in param_dtype
without one, and casts the sum into the parameter's dtype. fxpar's data-parallel buckets
(`bucket_grad_sync`, `fxpar.runtime.grad_sync`) used to sum in the parameter's dtype: float32 bytes on the
wire where torch sends bfloat16, and a bfloat16 sum where a bfloat16 model asks for float32.

Checked on dp=2 (gloo ranks): the dtype and bytes of the backward's all-reduce, explain()'s figure for it,
the gradients against a float64 unsplit model (within bf16 compute's bound) and bit-equal to torch's own
`replicate` with the same policy.
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

# the same model, batch, policies and bf16 bound as the HSDP test (measured 6.4e-3 to 9.4e-3 there)
from test_mixed_precision_hsdp import (BATCH, BF16, BF16_BOUND, DEPTH, DIM, F32, F64, HIDDEN, NUMEL,  # noqa: E402
                                       _data, _policy, _rel)


def _fxpar_step(mesh, model, policy) -> dict:
    x, y = _data(next(model.parameters()).dtype)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), mp_policy=policy)
    with fxpar.count_comms() as comms:
        pm.step(x, target=y, loss_fn=mse)
    wire = collections.defaultdict(lambda: [set(), 0])
    for c in comms:
        if c.direction == "backward":
            wire[f"{c.op} {c.mesh_dim}"][0].add(c.dtype)
            wire[f"{c.op} {c.mesh_dim}"][1] += c.nbytes
    sync_dtypes = {get_info(n).grad_sync.dtype for n in pm.graph_module.graph.nodes
                   if n.op == "get_attr" and get_info(n) is not None and get_info(n).grad_sync}
    return {"wire": dict(wire), "grads": pm.full_grads(), "sync_dtypes": sync_dtypes, "explain": pm.explain()}


def _torch_replicate_grads(mesh, model, policy) -> dict:
    """torch's replicate (FSDP2 on the replicated dp mesh) per block and at the root, each rank its batch half."""
    from torch.distributed._composable.replicate_with_fsdp import replicate

    x, y = _data(next(model.parameters()).dtype)
    n, rank = dist.get_world_size(), dist.get_rank()
    for block in model.blocks:
        replicate(block, mesh=mesh, mp_policy=policy)
    replicate(model, mesh=mesh, mp_policy=policy)
    model.set_force_sum_reduction_for_comms(True)  # gloo has no ReduceOp.AVG: sum, then divide by dp
    b = BATCH // n
    mse(model(x[rank * b:(rank + 1) * b]), y[rank * b:(rank + 1) * b]).backward()
    return {k: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad) for k, p in model.named_parameters()}


def _case(model_dtype, param_dtype, reduce_dtype) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    model = BlockStack(DEPTH, DIM, HIDDEN, seed=0).to(model_dtype)
    out = _fxpar_step(mesh, copy.deepcopy(model), _policy(param_dtype, reduce_dtype))
    ref = copy.deepcopy(model).to(F64)
    x, y = _data(model_dtype, ref=True)
    mse(ref(x), y).backward()
    out["ref"] = {k: p.grad for k, p in ref.named_parameters()}
    out["torch"] = _torch_replicate_grads(mesh, copy.deepcopy(model), _policy(param_dtype, reduce_dtype))
    return out


# (model dtype, param_dtype, reduce_dtype) -> the dtype the dp all-reduce runs in, as torch's replicate's
CASES = {
    "fp32_bf16_none": (F32, BF16, None, BF16),  # no reduce_dtype: the compute dtype (was float32)
    "fp32_bf16_fp32": (F32, BF16, F32, F32),
    "bf16_bf16_fp32": (BF16, BF16, F32, F32),  # parameters already in param_dtype: still reduced in float32
    "fp32_none_bf16": (F32, None, BF16, BF16),  # reduce_dtype alone
}


@pytest.mark.parametrize("case", [c if c == "fp32_bf16_none" else pytest.param(c, marks=pytest.mark.slow)
                                  for c in CASES])
def test_dp_reduces_in_reduce_dtype_like_torch_replicate(case):
    model_dtype, param_dtype, reduce_dtype, wire_dtype = CASES[case]
    for rank, r in enumerate(rank_pool(2).run(_case, model_dtype, param_dtype, reduce_dtype, timeout=180)):
        wire = r["wire"]
        assert set(wire) == {"all_reduce dp"}, (rank, wire)
        assert wire["all_reduce dp"] == [{wire_dtype}, NUMEL * wire_dtype.itemsize], (rank, case, wire)
        assert r["sync_dtypes"] == {None if wire_dtype == model_dtype else wire_dtype}, r["sync_dtypes"]
        assert f"{fmt_bytes(NUMEL * wire_dtype.itemsize)} per step over dp" in r["explain"], r["explain"]
        for k, g in r["grads"].items():
            assert g.dtype == model_dtype, (k, g.dtype)  # the sum lands in the parameter's dtype
            assert _rel(g, r["ref"][k]) < BF16_BOUND, (rank, case, k, _rel(g, r["ref"][k]))
            # torch's replicate: the same bf16 compute, the same sum in the same dtype, then the mean's
            # power-of-two division (exact either way round)
            assert torch.equal(g, r["torch"][k]), (rank, case, k, _rel(g, r["torch"][k]))
