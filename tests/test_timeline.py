"""The step timeline's FSDP backward (fxpar.analysis.timeline): re-gathers, reduce-scatters and their windows,
in the order fxpar.runtime.fsdp_buckets issues them; content, not pixels."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.analysis.timeline import rank_timeline
from fxpar.passes import schedule_overlap

from tests.models import BlockStack

X = (torch.randn(8, 4, 32),)


def _plan(**kwargs):
    return fxpar.plan(BlockStack(), {"fsdp": 2}, example_inputs=X, **kwargs)


def _fsdp_comm(t):
    """The backward's FSDP collectives on the comm lane, in start order, as (what, block)."""
    out = []
    for b in sorted(t.lane("comm"), key=lambda b: b.start):
        if "(re-gather)" in b.label:
            out.append(("gather", b.label.split(" of ")[1].split(" ")[0], b.kind))
        elif b.label.startswith("reduce_scatter(fsdp) of"):
            out.append(("rs", b.label.split(" of ")[1].split(" ")[0], b.kind))
    return out


@pytest.fixture(scope="module")
def overlapped():
    return _plan()


def test_backward_lanes_follow_the_runtime_order(overlapped):
    t = rank_timeline(overlapped.module)
    # the last block is re-gathered at the top of the backward (nothing prefetched it); each block before it is
    # prefetched during the block after it, and its reduce-scatter follows that prefetch (one in flight)
    assert _fsdp_comm(t) == [
        ("gather", "blocks.3", "collective"),
        ("gather", "blocks.2", "regather"), ("rs", "blocks.3", "reduce_scatter"),
        ("gather", "blocks.1", "regather"), ("rs", "blocks.2", "reduce_scatter"),
        ("gather", "blocks.0", "regather"), ("rs", "blocks.1", "reduce_scatter"),
        ("rs", "blocks.0", "reduce_scatter")]
    backward = [b for b in t.lane("compute") if b.kind == "backward"]
    gm = overlapped.graph_module
    matmuls = {n.name for n in gm.graph.nodes if n.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)}
    for k in range(4):
        regather = next(b for b in t.lane("comm") if b.label == f"all_gather(fsdp) of blocks.{k} (re-gather)")
        # block k's weights are back before any of its matmuls' backward runs
        assert all(b.start >= regather.end for b in backward if b.node in matmuls and b.module.startswith(f"blocks.{k}."))
    assert t.makespan >= max(b.end for b in t.lane("comm"))  # the step waits for the last reduce-scatter


def test_each_regather_window_holds_the_rest_of_the_block_after_it(overlapped):
    t = rank_timeline(overlapped.module)
    windows = {o.collective: o for o in t.overlaps}
    for k in range(3):
        o = windows[f"all_gather(fsdp) of blocks.{k} (re-gather)"]
        assert o.issue == f"half of blocks.{k + 1}'s gradients"
        # waited at the first backward op that unpacks one of block k's weights: its down projection
        wait = next(n for n in overlapped.graph_module.graph.nodes if f"%{n.name} (backward)" == o.wait)
        assert wait.meta["fxpar"].module_fqn == f"blocks.{k}.down"
        # under it: block k+1's norm (its up and down gradients are in), and block k's residual add only
        assert f"blocks.{k + 1}.norm" in o.modules
        assert set(o.modules) <= {f"blocks.{k + 1}.norm", f"blocks.{k + 1}", f"blocks.{k}"}, o.modules
        assert not any(m.startswith(f"blocks.{k}.") for m in o.modules)


def test_each_reduce_scatter_runs_under_the_backward_of_the_block_before(overlapped):
    t = rank_timeline(overlapped.module)
    windows = {o.collective: o for o in t.overlaps}
    for k in range(1, 4):
        o = windows[f"reduce_scatter(fsdp) of blocks.{k} (dual)"]
        assert o.issue == f"blocks.{k}'s last gradient" and o.wait == f"blocks.{k - 1}'s reduce-scatter"
        assert {f"blocks.{k - 1}.down", f"blocks.{k - 1}.up", f"blocks.{k - 1}.norm"} <= set(o.modules)
        assert all(m.startswith(f"blocks.{k - 1}") for m in o.modules), o.modules
    last = windows["reduce_scatter(fsdp) of blocks.0 (dual)"]
    assert last.wait == "the end of the backward" and not last.ops
    text = t.text()
    assert "reduce_scatter(fsdp) of blocks.2 (dual): issued at blocks.2's last gradient" in text
    assert "all_gather(fsdp) of blocks.1 (re-gather): issued at half of blocks.2's gradients" in text


def test_without_overlap_every_backward_collective_blocks():
    passes = [p for p in fxpar.default_passes() if p is not schedule_overlap]
    t = rank_timeline(_plan(passes=passes).module)
    comm = _fsdp_comm(t)
    assert [(w, b) for w, b, _ in comm] == [("gather", "blocks.3"), ("rs", "blocks.3"), ("gather", "blocks.2"),
                                           ("rs", "blocks.2"), ("gather", "blocks.1"), ("rs", "blocks.1"),
                                           ("gather", "blocks.0"), ("rs", "blocks.0")]
    assert {kind for *_, kind in comm} == {"collective"} and not t.overlaps
    # blocking: no backward op runs while one of them is on the comm lane
    backward = [b for b in t.lane("compute") if b.kind == "backward"]
    for bar in (b for b in t.lane("comm") if "(re-gather)" in b.label or "reduce_scatter" in b.label):
        assert not any(bar.start < b.start < bar.end - 1e-15 for b in backward), bar.label


def test_kept_gathered_parameters_are_not_regathered():
    t = rank_timeline(_plan(reshard_after_forward=False).module)
    comm = _fsdp_comm(t)
    assert [w for w, *_ in comm] == ["rs"] * 4 and [b for _, b, _ in comm] == [f"blocks.{k}" for k in (3, 2, 1, 0)]


def test_per_parameter_units_reduce_scatter_each_parameter_where_its_gradient_is_complete():
    t = rank_timeline(_plan(fsdp_unit="param").module)
    comm = _fsdp_comm(t)
    assert len([c for c in comm if c[0] == "rs"]) == 4 * 6 and {c[2] for c in comm} == {"collective"}
    assert len([c for c in comm if c[0] == "gather"]) == 4 * 6  # each weight re-gathered alone, blocking


# --------------------------------------------------------------------------- measured profiles (2 gloo ranks)

def _measured():
    from fxpar.analysis.timeline import measure_profile
    from tests.models import mse

    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    model = BlockStack().double()
    x, y = torch.randn(8, 4, 32, dtype=torch.float64), torch.randn(8, 4, 32, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    pm.step(x, target=y, loss_fn=mse)
    plain = [p.grad.clone() for p in pm.parameters()]
    pm.zero_grad()
    profile = measure_profile(pm, x, target=y, loss_fn=mse, warmup=0, iters=1)  # one step: its gradients
    watched = [p.grad.clone() for p in pm.parameters()]
    t = rank_timeline(pm, profile=profile)
    gm = pm.graph_module
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and hasattr(n.target, "_schema")]
    forward = {b.node: b.end - b.start for b in t.lane("compute") if b.kind == "forward"}
    backward = {b.node: b.end - b.start for b in t.lane("compute") if b.kind == "backward"}
    return dict(profile=profile, ops=[(n.name, str(n.target)) for n in ops], forward=forward, backward=backward,
                measured=t.measured, same=all(torch.equal(a, b) for a, b in zip(plain, watched)),
                matmuls=[n.name for n in ops if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.linear.default)])


def test_measured_profile_times_every_node_and_the_timeline_draws_it():
    from fxpar.testing import rank_pool

    for r in rank_pool(2).run(_measured):
        profile = r["profile"]
        timed = [name for name, target in r["ops"] if "fsdp_prefetch" not in target]
        assert set(timed) <= set(profile), sorted(set(timed) - set(profile))  # every op call matched to its node
        assert not [name for name, target in r["ops"] if "fsdp_prefetch" in target and name in profile]
        assert all(profile[n] > 0 for n in timed)
        assert all(profile[f"{n}.backward"] > 0 for n in r["matmuls"]) and len(r["matmuls"]) == 8
        assert r["same"]  # watching changes nothing: the gradients are bit-equal to a plain step's
        assert r["measured"]
        for n in r["matmuls"]:  # the timeline's bars are the measured times
            assert r["forward"][n] == pytest.approx(profile[n], rel=1e-12)
            assert r["backward"][n] == pytest.approx(profile[f"{n}.backward"], rel=1e-12)


def test_chart_draws_the_backward_collectives(overlapped, tmp_path):
    import xml.etree.ElementTree as ET

    pytest.importorskip("matplotlib", reason="charts need matplotlib (in the 'test' and 'viz' extras)")
    from fxpar import viz

    root = ET.parse(viz.timeline_chart(overlapped, tmp_path / "step.svg")).getroot()
    ids = [g.get("id") or "" for g in root.iter("{http://www.w3.org/2000/svg}g")]
    # three prefetched re-gathers (blocks 2, 1, 0) and the four reduce-scatters waited late, each a bar ...
    assert sum(i.startswith("regather:") for i in ids) == 3 and sum(i.startswith("reduce_scatter:") for i in ids) == 4
    # ... and each window shaded: three forward prefetches, three re-gathers, four reduce-scatters
    assert sum(i.startswith("overlap:") for i in ids) == 10
