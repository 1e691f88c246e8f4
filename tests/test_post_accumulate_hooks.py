"""Post-accumulate-grad hooks (optimizer-in-backward) on FSDP shards run once, with the reduce-scattered gradient.

A bucketed FSDP shard gets its gradient from its block's reduce-scatter, not from autograd, which would still
run the shard's hooks from its AccumulateGrad with nothing in `.grad` (on the first backward) or the earlier
backwards' sum. fxpar holds them there and runs them once `.grad` is the step's gradient, as FSDP2 runs them after
its reduce-scatter: on fsdp (tests/test_fsdp_root_unit.py) and HSDP (dp x fsdp, after the sum over dp). A
pipeline runs one backward per microbatch: every parameter's hooks run once, when the step's gradient is in
(fsdp x pp, gathered once per step: after its reduce-scatter and the earlier steps' gradient added back).
"""

from __future__ import annotations

import copy

import pytest
import torch

import fxpar
from fxpar.testing import rank_pool
from models import MLPStack, mse


def _hooked_step(names: tuple, pp: bool) -> dict:
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=names)
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32, depth=4).double()
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    kw = {"plan": fxpar.Plan(pp=2, schedule="gpipe", microbatches=2), "reshard_after_forward": False} if pp else {}
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), **kw)
    params = list({id(p): p for p in pm.parameters()}.values())
    ran = []
    handles = [p.register_post_accumulate_grad_hook(lambda q: ran.append((q, q.grad.clone()))) for p in params]
    pm.step(x, target=target, loss_fn=mse)
    out = {"once": sorted(id(q) for q, _ in ran) == sorted(id(p) for p in params),
           "final": all(torch.equal(g, q.grad) for q, g in ran), "ran": len(ran), "params": len(params)}
    # a second step without zeroing: the hooks see the accumulated gradient, once each again
    ran.clear()
    pm.step(x, target=target, loss_fn=mse)
    out["again"] = len(ran) == len(params) and all(torch.equal(g, q.grad) for q, g in ran)
    for h in handles:
        h.remove()
    ran.clear()
    pm.step(x, target=target, loss_fn=mse)
    out["removed"] = not ran
    ref = copy.deepcopy(model)
    mse(ref(x), target).backward()
    grads = pm.full_grads()
    out["grad_err"] = max(((grads[k] - 3 * p.grad).abs().max() / p.grad.abs().max()).item()
                          for k, p in ref.named_parameters())
    return out


@pytest.mark.parametrize("names,pp", [(("dp", "fsdp"), False), (("fsdp", "pp"), True)], ids=["hsdp", "fsdp-pp"])
def test_post_accumulate_grad_hooks_run_once_with_the_reduced_gradient(names, pp):
    for r in rank_pool(4).run(_hooked_step, names, pp, timeout=300):
        assert r["once"] and r["final"] and r["again"] and r["removed"], {k: v for k, v in r.items() if k != "grad_err"}
        assert r["grad_err"] < 1e-12, r


def _sgd_in_backward(overlap: bool) -> dict:
    """An optimizer step in the hook (torch's documented optimizer-in-backward pattern) against the same step
    taken after the backward: equal, each parameter stepped once."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)
    model = MLPStack(dim=16, hidden=32, depth=4).double()
    x, target = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm, ref = (fxpar.parallelize(model, mesh, example_inputs=(x,), overlap=overlap) for _ in range(2))
    lr, calls = 0.1, []

    def sgd(q):
        calls.append(id(q))
        q.add_(q.grad, alpha=-lr)  # in place on the leaf: hooks run under no_grad, as autograd runs them
        q.grad = None

    for p in pm.parameters():
        p.register_post_accumulate_grad_hook(sgd)
    for _ in range(2):
        pm.step(x, target=target, loss_fn=mse)
        ref.step(x, target=target, loss_fn=mse)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(p.grad, alpha=-lr)
                p.grad = None
    return {"once": sorted(calls) == sorted(2 * [id(p) for p in pm.parameters()]),
            "equal": all(torch.equal(a, b) for a, b in zip(pm.parameters(), ref.parameters())),
            "grads_left": sum(p.grad is not None for p in pm.parameters())}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "waiting"])
def test_optimizer_in_backward_equals_the_step_after_it(overlap):
    # waiting: a block's reduce-scatter is waited inside its last shard's backward, before that shard's
    # AccumulateGrad, which must not find the hooks back and run them a second time
    for r in rank_pool(2).run(_sgd_in_backward, overlap, timeout=300):
        assert r["once"] and r["equal"] and r["grads_left"] == 0, r
