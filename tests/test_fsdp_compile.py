"""parallelize(fsdp mesh, compile=...): FSDP units as functional collectives, equal to eager and unsplit in float64."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.ops.traceable import traceable_graph_module
from fxpar.ops.traceable_fsdp import (fsdp_gather_unit, fsdp_group_names, fsdp_units_of, prefetch_fsdp_gathers,
                                      reshard_fsdp_gathers, traceable_fsdp_graph_module)
from fxpar.testing import rank_pool
from fxpar.verify.compiled_order import check_compiled_order
from tests.models import BlockStack, mse

_funcol = torch.ops._c10d_functional


def _model_and_batch(dim: int, dtype=torch.float64):
    torch.manual_seed(0)
    model = BlockStack(2, dim, 32).to(dtype)
    x = torch.randn(4, 8, dim, dtype=dtype)
    return model, x, torch.randn_like(x)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compiled_vs_eager_vs_unsplit(shape, names, backend, dim, mp):
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    model, x, y = _model_and_batch(dim, torch.float32 if mp else torch.float64)
    kw = {}
    if mp:
        from torch.distributed.fsdp import MixedPrecisionPolicy
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    eager = fxpar.parallelize(model, mesh, example_inputs=(x,), **kw)
    compiled = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=backend, **kw)
    fxpar.check(compiled)
    losses = [float(pm.step(x, target=y, loss_fn=mse).detach()) for pm in (eager, compiled)]
    model.zero_grad(set_to_none=True)
    ref = mse(model(x), y)
    ref.backward()
    ge, gc = eager.full_grads(), compiled.full_grads()
    params = dict(model.named_parameters())
    # inductor's reordered graphs (prefetch_fsdp_gathers, then its comm passes): the same collective order on
    # every rank of each group, as compiled (raises naming the first difference otherwise)
    orders = check_compiled_order(compiled, x, target=y, loss_fn=mse) if backend is True else None
    return {"losses": losses, "ref": float(ref), "vs_eager": max(_rel(gc[k], ge[k]) for k in ge),
            "vs_unsplit": max(_rel(gc[k], params[k].grad) for k in gc), "keys": sorted(gc) == sorted(params),
            "lowered": len(fsdp_units_of(compiled.graph_module.graph)),
            "compiled_collectives": None if orders is None else sum(len(o) for o in orders)}


@pytest.mark.parametrize("shape,names,backend,dim,mp", [
    ((2,), ("fsdp",), "aot_eager", 16, False),
    # (the default run is at its CI budget: the variants go in the slow set, about 12 s each)
    pytest.param((2,), ("fsdp",), "aot_eager", 15, False, marks=pytest.mark.slow),  # uneven: 15 rows, padded
    pytest.param((2,), ("fsdp",), "aot_eager", 16, True, marks=pytest.mark.slow),
    pytest.param((2,), ("fsdp",), True, 16, False, marks=pytest.mark.slow),  # inductor: about a minute
    pytest.param((2, 2), ("fsdp", "tp"), "aot_eager", 16, False, marks=pytest.mark.slow),  # 4 ranks: 40 s
], ids=["fsdp2", "fsdp2-uneven", "fsdp2-bf16", "fsdp2-inductor", "fsdp2xtp2"])
def test_compiled_fsdp_equals_eager_and_unsplit(shape, names, backend, dim, mp):
    world = shape[0] * (shape[1] if len(shape) > 1 else 1)
    for r in rank_pool(world).run(_compiled_vs_eager_vs_unsplit, shape, names, backend, dim, mp, timeout=600):
        assert r["lowered"] > 0 and r["keys"]
        assert backend is not True or r["compiled_collectives"] >= 3 * r["lowered"], r  # gather, re-gather, r-s
        if mp:  # bf16 compute: the same ops in the same dtype as eager fsdp, bit for bit
            assert r["losses"][0] == r["losses"][1] and r["vs_eager"] == 0.0, r
            continue
        assert abs(r["losses"][1] - r["ref"]) <= 1e-12 * abs(r["ref"]) and r["losses"][0] == r["losses"][1], r
        assert r["vs_eager"] <= 1e-10 and r["vs_unsplit"] <= 1e-10, r


def _compiler_graphs(reshard: bool):
    """Forward and backward graphs AOT autograd hands the compiler for this rank's lowered fsdp graph."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    model, x, y = _model_and_batch(16)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    y = y.chunk(2)[torch.distributed.get_rank()]  # the graph's output is this rank's batch shard
    units = fsdp_units_of(pm.graph_module.graph)
    lowered = traceable_fsdp_graph_module(traceable_graph_module(pm.graph_module))
    left = [str(n.target) for n in lowered.graph.nodes if str(n.target).startswith("fxpar.fsdp")]
    calls = sum(n.target is fsdp_gather_unit for n in lowered.graph.nodes)
    kept = lowered.graph.eliminate_dead_code() is False
    graphs, moved = [], []

    def keep(gm, example_inputs):
        graphs.append(gm)
        # the post-grad pass inductor runs (here on aot_eager's graphs, which then run: exactness covers it)
        moved.append(prefetch_fsdp_gathers(gm.graph, fsdp_group_names(lowered)))
        gm.graph.lint()
        gm.recompile()
        return make_boxed_func(gm)

    # inductor's partitioner (min-cut): it puts each recomputed gather right before its use
    backend = aot_autograd(fw_compiler=keep, bw_compiler=keep, partition_fn=min_cut_rematerialization_partition)
    compiled = torch.compile(lowered, backend=backend, dynamic=False)
    with reshard_fsdp_gathers(fsdp_group_names(lowered), reshard=reshard):
        loss = mse(compiled(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lowered.named_parameters()}
    for p in pm.graph_module.parameters():
        p.grad = None
    eager_loss = mse(pm.graph_module(x), y)
    eager_loss.backward()
    exact = torch.equal(loss.detach(), eager_loss.detach()) and all(
        torch.equal(grads[n], p.grad) for n, p in pm.graph_module.named_parameters())

    def count(gm, op):
        return sum(1 for n in gm.graph.nodes if n.target == op)

    # on gloo a unit's reduce-scatter is an all-to-all and the sum of the blocks received (reduce_scatter_flat):
    # gloo's own reduce-scatter all-reduces the whole buffer
    ops = (_funcol.all_gather_into_tensor.default, _funcol.all_to_all_single.default, _funcol.wait_tensor.default)
    # what the forward saves for the backward (its outputs after the loss) that comes from a gather
    fw = graphs[0]
    gathered = set()
    for n in fw.graph.nodes:
        if n.target == ops[0] or any(i in gathered for i in n.all_input_nodes):
            gathered.add(n)
    out = next(n for n in fw.graph.nodes if n.op == "output").args[0]
    saved = [a for a in out[1:] if isinstance(a, torch.fx.Node)]
    comm_order = [["AG" if n.target == ops[0] else "RS" for n in gm.graph.nodes if n.target in ops[:2]]
                  for gm in graphs]
    return {"units": len(units), "calls": calls, "left": left, "kept": kept, "exact": exact, "moved": moved,
            "comm_order": comm_order,
            "counts": [[count(gm, op) for op in ops] for gm in graphs],
            "gloo_reduce_scatters": sum(count(gm, _funcol.reduce_scatter_tensor.default) for gm in graphs),
            "saved_from_gathers": sum(a in gathered for a in saved)}


@pytest.mark.parametrize("reshard", [True, False], ids=["reshard", "keep"])
def test_fsdp_units_reach_the_compiler_as_one_gather_and_one_reduce_scatter_each(reshard):
    """One all-gather per block forward, its reduce-scatter in the backward, each with its own wait; with
    reshard_after_forward the backward gathers each block again (one block ahead: before the reduce-scatter of
    the block after it) and the forward saves no full parameter."""
    for r in rank_pool(2).run(_compiler_graphs, reshard, timeout=600):
        assert not r["left"] and r["kept"] and r["exact"], r
        assert r["units"] == r["calls"] == 2, r  # one per block of the BlockStack
        (fw_ag, fw_rs, fw_wait), (bw_ag, bw_rs, bw_wait) = r["counts"]
        assert (fw_ag, fw_rs, fw_wait) == (2, 0, 2), r
        assert bw_rs == 2 and bw_ag == (2 if reshard else 0) and bw_wait == bw_ag + bw_rs, r
        assert r["gloo_reduce_scatters"] == 0, r
        if reshard:  # shards and activations only: nothing computed from a gathered parameter is kept
            assert r["saved_from_gathers"] == 0, r
            # block 0's re-gather comes before block 1's reduce-scatter (inductor's own post-grad graph puts it
            # after: test_prefetch_moves_each_regather_ahead_of_the_reduce_scatter_before_it)
            assert r["moved"][0] == 0 and r["comm_order"][1] == ["AG", "AG", "RS", "RS"], r
        else:
            assert r["saved_from_gathers"] > 0, r
            assert r["moved"] == [0, 0] and r["comm_order"][1] == ["RS", "RS"], r


def _reduce_scatter(g, x, form):
    if form == "reduce_scatter_tensor":
        return g.call_function(_funcol.reduce_scatter_tensor.default, (x, "sum", 2, "fsdp_group"))
    return g.call_function(_funcol.all_to_all_single.default, (x, [4, 4], [4, 4], "fsdp_group"))  # gloo's form


def _backward_like_graph(form="reduce_scatter_tensor"):
    """A backward as inductor's post-grad graph orders it: each block's re-gather right before its use,
    after the reduce-scatter of the block after it (`form`: torch's, or on gloo an all-to-all)."""
    g = torch.fx.Graph()
    shard1, shard0, grad = g.placeholder("primals_1"), g.placeholder("primals_2"), g.placeholder("tangents_1")
    gather1 = g.call_function(_funcol.all_gather_into_tensor.default, (shard1, 2, "fsdp_group"))
    w1 = g.call_function(_funcol.wait_tensor.default, (gather1,))
    d1 = g.call_function(torch.ops.aten.mm.default, (grad, w1))
    rs1 = _reduce_scatter(g, d1, form)
    g.call_function(_funcol.wait_tensor.default, (rs1,))
    flat0 = g.call_function(torch.ops.aten.cat.default, ([shard0],))  # the unit's flat buffer
    gather0 = g.call_function(_funcol.all_gather_into_tensor.default, (flat0, 2, "fsdp_group"))
    w0 = g.call_function(_funcol.wait_tensor.default, (gather0,))
    d0 = g.call_function(torch.ops.aten.mm.default, (d1, w0))
    rs0 = _reduce_scatter(g, d0, form)
    g.output(g.call_function(_funcol.wait_tensor.default, (rs0,)))
    return g, rs1, w0


@pytest.mark.parametrize("form", ["reduce_scatter_tensor", "all_to_all_single"])
def test_prefetch_moves_each_regather_ahead_of_the_reduce_scatter_before_it(form):
    g, rs1, w0 = _backward_like_graph(form)
    names = {_funcol.all_gather_into_tensor.default: "AG", _funcol.reduce_scatter_tensor.default: "RS",
             _funcol.all_to_all_single.default: "RS"}

    def order():
        return [names[n.target] for n in g.nodes if n.target in names]

    assert order() == ["AG", "RS", "AG", "RS"]
    assert prefetch_fsdp_gathers(g, {"other_group"}) == 0 and order() == ["AG", "RS", "AG", "RS"]
    assert prefetch_fsdp_gathers(g, {"fsdp_group"}) == 1
    g.lint()  # every node still after its inputs: the gather's flat buffer moved with it
    assert order() == ["AG", "AG", "RS", "RS"]
    nodes = list(g.nodes)
    assert nodes.index(w0) > nodes.index(rs1)  # only the issue moves: block 0 is waited where it is used
    assert prefetch_fsdp_gathers(g, {"fsdp_group"}) == 0  # already in place


def _tied_gpt_compiled():
    import torch.distributed as dist

    from benchmarks.models import ModelConfig, batch, build, cross_entropy
    from fxpar.analysis.compiled_schedule import compiled_schedules

    cfg = ModelConfig("gpt2", layers=2, dim=32, heads=4, hidden=64, vocab=64, batch=4, seq=8)
    model = build(cfg).double()
    ids, target = batch(cfg)
    r = dist.get_rank()
    ids, target = ids.chunk(2)[r], target.chunk(2)[r]
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    losses, grads = [], []
    for compiled in (False, True):
        pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), input_layout="local", compile=compiled)
        losses.append(pm.step(ids, target=target, loss_fn=cross_entropy).item())
        grads.append({k: v for k, v in pm.full_grads().items()})
    roles = sorted(compiled_schedules(pm))
    # against the largest gradient: k_proj's bias gets a zero gradient up to rounding (softmax ignores a constant
    # added to every key), so its own relative error is noise over noise
    scale = max(g.abs().max().item() for g in grads[0].values())
    return losses, max((grads[1][k] - grads[0][k]).abs().max().item() for k in grads[0]) / scale, roles


@pytest.mark.slow  # an inductor compile of a training step
def test_tied_gpt_under_compiled_fsdp_records_its_schedule():
    """The benchmark's GPT (lm_head tied to the token embedding, a position table gathered outside the units):
    inductor compiles it with fxpar's schedule recorder (a multi-output kernel's layout has no size: it once raised
    NotImplementedError inside the compile), and the compiled step equals eager."""
    for (eager, compiled), worst, roles in rank_pool(2).run(_tied_gpt_compiled, timeout=600):
        assert abs(eager - compiled) <= 1e-12 * abs(eager) and worst <= 1e-10
        assert roles == ["backward", "forward"]
