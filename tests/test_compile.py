"""parallelize(..., compile=...): each rank's rewritten graph under torch.compile, equal to eager in float64."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.ops.traceable import LOWERED_OPS, lowered_collectives, traceable_graph_module
from fxpar.testing import rank_pool
from tests.models import BlockStack, MLPStack, mse

_funcol = torch.ops._c10d_functional


def _compiled_vs_eager(shape, names, backend, plan=None):
    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    if plan is not None and plan.sequence_parallel:  # (B, T, C): sequence shards between the blocks
        model = BlockStack(2, 16, 32).double()
        x, y = torch.randn(4, 8, 16, dtype=torch.float64), torch.randn(4, 8, 16, dtype=torch.float64)
    else:
        model = MLPStack(16, 32, 2).double()
        x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    eager = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan)
    compiled = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=backend, plan=plan)
    worst = 0.0
    for pm in (eager, compiled):
        pm.step(x, target=y, loss_fn=mse)
    for (n, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        worst = max(worst, float((a.grad - b.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)))
    out = float((eager(x) - compiled(x)).abs().max())
    report = fxpar.verify(model, compiled, x, target=y, loss_fn=mse)
    return out, worst, report.ok, compiled.compile_backend


@pytest.mark.parametrize("shape,names,backend,plan", [
    ((2,), ("tp",), True, None),
    ((2,), ("fsdp",), "aot_eager", None),
    ((2,), ("tp",), "aot_eager", fxpar.Plan(auto_tp=True, sequence_parallel=True)),
    ((2, 2), ("dp", "tp"), "aot_eager", None),
    pytest.param((2,), ("tp",), True, fxpar.Plan(auto_tp=True, sequence_parallel=True), marks=pytest.mark.slow),
    pytest.param((2, 2), ("dp", "tp"), True, None, marks=pytest.mark.slow),
], ids=["tp2-inductor", "fsdp2-aot_eager", "tp2-sp-aot_eager", "dp2xtp2-aot_eager", "tp2-sp-inductor",
        "dp2xtp2-inductor"])
def test_compiled_graph_equals_eager_in_float64(shape, names, backend, plan):
    world = 1
    for s in shape:
        world *= s
    # inductor compiles (train, no_grad, verify's) take minutes on a loaded machine
    results = rank_pool(world).run(_compiled_vs_eager, shape, names, backend, plan, timeout=600)
    for out, worst, ok, used in results:
        assert out <= 1e-12 and worst <= 1e-10 and ok
        assert used == ("inductor" if backend is True else backend)


def _compiler_graphs(plan):
    """The forward and backward graphs AOT autograd hands the compiler for this rank's lowered graph."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = BlockStack(2, 16, 32).double()
    x = torch.randn(4, 8, 16, dtype=torch.float64, requires_grad=True)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x.detach(),), plan=plan)
    fxpar_ops = [n.target for n in pm.graph_module.graph.nodes if n.target in LOWERED_OPS]
    lowered = traceable_graph_module(pm.graph_module)
    left = [n.target for n in lowered.graph.nodes if n.target in LOWERED_OPS]
    kept = len(lowered_collectives(lowered)) == 0 and lowered.graph.eliminate_dead_code() is False
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)

    compiled = torch.compile(lowered, backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), dynamic=False)
    out = compiled(x)
    out.sum().backward()
    ref = x.detach().clone().requires_grad_()
    eager_out = pm(ref)
    eager_out.sum().backward()
    exact = torch.equal(out.detach(), eager_out.detach()) and torch.allclose(x.grad, ref.grad, rtol=1e-12, atol=0)

    a2a = _funcol.all_to_all_single.default

    def swaps(n):  # on a gloo group of 2 an all-reduce or all-gather is one all-to-all sending all to the other
        return n.target is a2a and 0 in n.args[1]

    def count(gm):
        nodes = list(gm.graph.nodes)
        return [sum(n.target is _funcol.all_reduce.default for n in nodes),
                sum(n.target is _funcol.all_gather_into_tensor.default for n in nodes),
                sum(n.target is _funcol.reduce_scatter_tensor.default or (n.target is a2a and not swaps(n))
                    for n in nodes),  # on gloo an all-to-all and a sum (fxpar.ops.waiting.start_reduce_scatter)
                sum(n.target is _funcol.wait_tensor.default for n in nodes),
                sum(swaps(n) for n in nodes)]

    names = [str(t) for t in fxpar_ops]
    return names, left, kept, exact, [count(gm) for gm in graphs]


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_tp_collectives_reach_the_compiler_as_issue_and_wait_nodes(sp):
    """The compiler sees torch's functional collectives, each with its own wait, forward and backward duals."""
    plan = fxpar.Plan(auto_tp=True, sequence_parallel=True) if sp else None
    for names, left, kept, exact, (fw, bw) in rank_pool(2).run(_compiler_graphs, plan):
        assert not left and kept and exact
        n = {op: names.count(f"fxpar.{op}.default") for op in
             ("all_reduce", "grad_all_reduce", "all_gather", "sp_all_gather", "shard", "reduce_scatter")}
        # forward: all_reduce (Partial -> Replicate), gathers (sp's g, the output's), reduce_scatter (sp's g-bar);
        # f (grad_all_reduce) and shard communicate nothing. On gloo with 2 ranks the all-reduces and gathers
        # are swaps (fxpar.ops.exchange), each with its own wait
        assert fw[:3] == [0, 0, n["reduce_scatter"]], (names, fw)
        assert fw[4] == n["all_reduce"] + n["sp_all_gather"] + n["all_gather"], (names, fw)
        assert fw[3] == fw[2] + fw[4] > 0, fw
        # backward: f's all_reduce; the gather's reduce_scatter (sp); the gathers of shard and reduce_scatter
        assert bw[:3] == [0, 0, n["sp_all_gather"]], (names, bw)
        assert bw[4] == n["grad_all_reduce"] + n["shard"] + n["reduce_scatter"], (names, bw)
        assert bw[3] == bw[2] + bw[4] > 0, bw


def test_pipelines_are_refused_with_the_way_out():
    with pytest.raises(fxpar.PlanError, match="compile=True does not run pipelines yet"):
        fxpar.plan(MLPStack(16, 32, 4), {"pp": 2}, example_inputs=(torch.randn(8, 16),))  # dry run: no compile
        fxpar.compiler.compile_model(MLPStack(16, 32, 4), None, fxpar.dryrun.dry_mesh({"pp": 2}),
                                     example_inputs=(torch.randn(8, 16),), compile=True,
                                     split_pp=fxpar.dryrun._split_pp_dry)


def _backward_code():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = BlockStack(2, 32, 64).double()
    x, y = torch.randn(4, 8, 32, dtype=torch.float64), torch.randn(4, 8, 32, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=True)
    _, codes = run_and_get_code(lambda: pm.step(x, target=y, loss_fn=mse))
    return codes


@pytest.mark.slow  # an inductor compile of a training step: about a minute on 2 loaded cores
def test_inductor_overlaps_every_block_backward_all_reduce_with_weight_gradient_matmuls():
    """Each block's input-gradient all-reduce is issued, weight-gradient matmuls run, then it is waited.

    (inductor's own pass, without fxpar's cost estimate, overlaps only the last block's.)"""
    codes = rank_pool(2).run(_backward_code, timeout=600)[0]
    overlapped = 0
    for code in codes:
        pending = False
        for line in code[code.index("def call("):].splitlines():
            # on gloo with 2 ranks the all-reduce is an all-to-all swapping the ranks' buffers (fxpar.ops.exchange)
            if "_c10d_functional.all_reduce_.default(" in line or "_c10d_functional.all_to_all_single.default(" in line:
                pending, between = True, 0
            elif pending and "extern_kernels.mm(" in line:
                between += 1
            elif pending and "_c10d_functional.wait_tensor.default(" in line:
                overlapped += between > 0
                pending = False
    assert overlapped >= 2, codes  # both blocks of the BlockStack
