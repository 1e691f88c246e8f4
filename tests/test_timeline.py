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
        # waited before block k-2's re-gather is issued, half-way through block k-1's backward (its buffers freed
        # before the gather's is allocated); block 0 prefetches nothing: block 1's runs under its whole backward
        assert o.issue == f"blocks.{k}'s last gradient", o
        assert o.wait == (f"blocks.{k - 2}'s re-gather" if k > 1 else "blocks.0's reduce-scatter"), o
        assert {f"blocks.{k - 1}.down", f"blocks.{k - 1}.up"} <= set(o.modules)
        assert (f"blocks.{k - 1}.norm" in o.modules) == (k == 1), o.modules
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


# --------------------------------------------------------------------------- compiled modules (inductor's order)

_AG, _RS, _WAIT = ("_c10d_functional.all_gather_into_tensor.default", "_c10d_functional.reduce_scatter_tensor.default",
                   "_c10d_functional.wait_tensor.default")


def _kernel(name, kind, op="", *, writes=(), reads=(), nbytes=0, unit="", modules=(), cost=None):
    """A ScheduledNode as the recorder sees one (fxpar._torch.inductor.scheduled_nodes)."""
    from fxpar._torch.inductor import ScheduledNode

    traced = (f'  File "<eval_with_key>.3", line 9, in forward\n    {unit} = fxpar_ops_traceable_fsdp_unit(2)',) \
        if unit else ()
    return ScheduledNode(name, kind, op, (), nbytes, ("2", "g0") if kind == "collective" else (), frozenset(reads),
                         frozenset(writes), traced, modules, cost)


def _recorded():
    """A forward and a backward as inductor might order them, with costs in units of a DeviceModel of 1000:
    the forward gathers block 1 under block 0 (one kernel uncosted); the backward waits its first reduce-scatter
    at once, then issues two gathers back to back (the second queued behind the first on the comm lane) and
    stalls on both."""
    from fxpar.analysis.compiled_schedule import build_schedule

    forward = [_kernel("op0", "compute", cost=(2000.0, 1000.0), modules=("blocks.0.norm",)),
               _kernel("op1", "collective", _AG, writes={"buf1"}, nbytes=4000, unit="unit_blocks_1"),
               _kernel("op2", "nop"),
               _kernel("op3", "compute", "extern_kernels.addmm", cost=(1000.0, 3000.0), modules=("blocks.0.up",)),
               _kernel("op4", "compute", modules=("blocks.0",)),  # no cost: its graph's mean, 2
               _kernel("op5", "wait", _WAIT, reads={"buf1"}),
               _kernel("op6", "compute", cost=(0.0, 1000.0), modules=("blocks.1.norm",))]
    backward = [_kernel("op0", "compute", cost=(1000.0, 0.0), modules=("blocks.1.down",)),
                _kernel("op1", "collective", _RS, writes={"buf1"}, nbytes=2000, unit="unit_blocks_1"),
                _kernel("op2", "wait", _WAIT, reads={"buf1"}),
                _kernel("op3", "compute", "extern_kernels.mm", cost=(4000.0, 0.0), modules=("blocks.0.down",)),
                _kernel("op4", "collective", _AG, writes={"buf4"}, nbytes=8000, unit="unit_blocks_0"),
                _kernel("op5", "collective", _AG, writes={"buf5"}, nbytes=1000, unit="unit_blocks_1"),
                _kernel("op6", "compute", cost=(2000.0, 0.0), modules=("blocks.0.up",)),
                _kernel("op7", "wait", _WAIT, reads={"buf4", "buf5"})]
    labels = {"unit_blocks_0": "fsdp unit blocks.0", "unit_blocks_1": "fsdp unit blocks.1"}
    return {role: build_schedule(order, role, labels, {"g0": "fsdp"})
            for role, order in (("forward", forward), ("backward", backward))}


@pytest.fixture
def compiled_pm(make_fake_mesh):
    mesh = make_fake_mesh((2,), ("fsdp",))
    return fxpar.parallelize(BlockStack(), mesh, example_inputs=X, compile=True)


def test_compiled_timeline_is_inductors_kernel_order(compiled_pm):
    from fxpar.analysis.compiled_schedule import compiled_schedule_lines
    from fxpar.analysis.cost import DeviceModel

    pm = compiled_pm
    pm.compiled_schedules = schedules = _recorded()  # as its first pm.step would have left them
    t = rank_timeline(pm, device=DeviceModel(flops=1e3, mem_bandwidth=1e3, mesh_bandwidth=1e3))
    assert "inductor's kernel order of the compiled forward and backward graphs" in t.title
    compute = [(b.node, b.kind, b.start, b.end) for b in t.lane("compute")]
    assert compute == [
        ("forward.op0", "forward", 0, 2), ("forward.op3", "forward", 2, 5), ("forward.op4", "forward", 5, 7),
        ("forward.op6", "forward", 7, 8),
        ("backward.op0", "backward", 8, 9), ("backward.op2", "wait", 9, 11),  # waited at once: a stall
        ("backward.op3", "backward", 11, 15), ("backward.op6", "backward", 15, 17),
        ("backward.op7", "wait", 17, 23), ("backward.op7", "wait", 23, 24)]  # both gathers still on the wire
    assert t.backward_from == 5 and t.makespan == 24  # bars[5:]: the backward graph's
    # the comm lane holds exactly the recorded collectives, in their order, with their bytes; each starts at
    # max(compute clock, comm clock) and takes bytes / L
    recorded = [c for role in ("forward", "backward") for c in schedules[role].collectives]
    comm = t.lane("comm")
    assert [(b.label, b.nbytes) for b in comm] == [
        (f"{c.op}(fsdp) of {c.what} ({role} graph)", c.nbytes)
        for role in ("forward", "backward") for c in schedules[role].collectives]
    assert [(b.node, b.kind, b.start, b.end) for b in comm] == [
        ("forward.op1", "issued", 2, 6), ("backward.op1", "collective", 9, 11),
        ("backward.op4", "issued", 15, 23), ("backward.op5", "issued", 23, 24)]
    assert [b.nbytes for b in comm] == [4000, 2000, 8000, 1000] == [c.nbytes for c in recorded]
    # every wait after its issue, and after it nothing computes before the collective is done
    for o, bar, c in zip(t.overlaps, comm, recorded):
        assert c.issue_at < c.wait_at and o.issue == bar.node.split(".")[0] + f".{c.issue}" and o.start <= o.end
        assert o.wait == bar.node.split(".")[0] + f".{c.wait}"
        assert all(b.start >= bar.end for b in t.lane("compute") if b.start >= o.end and b.kind != "wait")
    # each overlap's kernels are the ones explain() lists under its collective
    assert [(o.collective, o.ops) for o in t.overlaps] == [
        (b.label, tuple(f"{role}.{k.split()[0]}" for k in c.kernels))
        for b, (role, c) in zip(comm, [(r, c) for r in ("forward", "backward") for c in schedules[r].collectives])]
    assert [o.ops for o in t.overlaps] == [("forward.op3", "forward.op4"), (), ("backward.op6",), ("backward.op6",)]
    assert [(o.start, o.end) for o in t.overlaps] == [(2, 7), (9, 9), (15, 17), (15, 17)]
    assert t.overlaps[0].modules == ("blocks.0.up", "blocks.0")
    lines = compiled_schedule_lines(pm)
    assert "under it 2 compute kernels (1 extern: addmm) of blocks.0.up, blocks.0" in lines[4]
    text = t.text()
    assert "all_gather_into_tensor(fsdp) of blocks.1 (forward graph): issued at forward.op1 2.000 s, " \
           "waited at forward.op5 7.000 s; under it 2 ops of blocks.0.up, blocks.0" in text


def test_compiled_timeline_before_its_first_run_replays_the_eager_graph(compiled_pm):
    eager = rank_timeline(_plan().module)
    t = rank_timeline(compiled_pm)
    assert "compiled kernel order is shown once the module has run" in t.title
    assert t.bars == eager.bars and t.overlaps == eager.overlaps
    compiled_pm.compiled_schedules = {"forward": _recorded()["forward"]}  # a forward ran, no backward yet
    t = rank_timeline(compiled_pm)
    assert "the backward not compiled yet" in t.title and t.backward_from == -1
    assert "backward" not in {b.kind for b in t.lane("compute")}
    forward = rank_timeline(compiled_pm, backward=False)
    assert forward.bars == t.bars and "backward not compiled" not in forward.title
    # measured times are of the eager graph's nodes: with them, the eager graph is what is drawn, and said
    profiled = rank_timeline(compiled_pm, profile={"addmm": 1.0})
    assert profiled.bars == rank_timeline(_plan().module, profile={"addmm": 1.0}).bars
    assert "the compiled kernel order is drawn without profile=" in profiled.title


def test_compiled_timeline_chart_names_each_collective(compiled_pm, tmp_path):
    import xml.etree.ElementTree as ET

    pytest.importorskip("matplotlib", reason="charts need matplotlib (in the 'test' and 'viz' extras)")
    from fxpar import viz

    compiled_pm.compiled_schedules = _recorded()
    root = ET.parse(viz.timeline_chart(compiled_pm, tmp_path / "step.svg")).getroot()
    ids = {g.get("id") or "" for g in root.iter("{http://www.w3.org/2000/svg}g")}
    assert {"issued:forward.op1", "collective:backward.op1", "issued:backward.op4", "issued:backward.op5"} <= ids
    assert {"overlap:forward.op1", "overlap:backward.op4", "forward:forward.op3", "backward:backward.op6"} <= ids
    assert "issued at backward.op4" in viz.timeline_text(compiled_pm)


def test_a_fused_kernel_is_charged_its_flops_and_the_bytes_it_reads_and_writes_outside():
    from torch.fx.experimental.proxy_tensor import make_fx

    from fxpar.analysis.compiled_schedule import _kernel_cost

    gm = make_fx(lambda x, w: torch.relu(torch.mm(x, w) + 1.0))(torch.randn(4, 8, dtype=torch.float64),
                                                                  torch.randn(8, 16, dtype=torch.float64))
    mm, add, relu = (next(n for n in gm.graph.nodes if n.target == op)
                     for op in (torch.ops.aten.mm.default, torch.ops.aten.add.Tensor, torch.ops.aten.relu.default))
    assert _kernel_cost([mm]) == (2 * 4 * 16 * 8, 8 * (4 * 8 + 8 * 16 + 4 * 16))  # an extern matmul
    # add and relu fused: one elementwise FLOP each per element; the mm output read once, the relu output
    # written once, the add's result never leaves the kernel
    assert _kernel_cost([add, relu]) == (2 * 4 * 16, 8 * (4 * 16 + 4 * 16))
    assert _kernel_cost([mm, add, relu])[1] == 8 * (4 * 8 + 8 * 16 + 4 * 16)
