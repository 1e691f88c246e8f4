"""async_tp (fxpar.passes.async_tp): the batch split into chunks whose tp all-reduces (and, under
sequence parallel, gathers and reduce-scatters) are issued async.

Numerics against the unsplit graph (overlap=False) and the unsplit model in float64, loss and every
gradient; the issued collectives in the same order on every rank, with the unsplit graph's bytes;
fxpar.check catching a value read before its wait; the gate and the switches that turn the pass off.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.distributed as dist

import fxpar
import fxpar.passes as P
from benchmarks.models import ModelConfig, batch, build, cross_entropy
from fxpar.analysis.fingerprint import collective_schedule
from fxpar.core.mesh import MeshInfo
from fxpar.ops.async_tp import WAIT_OP
from fxpar.testing import rank_pool

START = torch.ops.fxpar.all_reduce_start.default
ALL_REDUCE = torch.ops.fxpar.all_reduce.default
AG_START, RS_START = torch.ops.fxpar.sp_all_gather_start.default, torch.ops.fxpar.reduce_scatter_start.default
SP_AG, RS = torch.ops.fxpar.sp_all_gather.default, torch.ops.fxpar.reduce_scatter.default
SP = {"auto_tp": True, "sequence_parallel": True}
TINY = ModelConfig("gpt2", layers=2, dim=64, heads=4, hidden=256, vocab=256, batch=4, seq=16)
FORCED = P.AsyncTP(min_chunk_bytes=0, min_chunk_flops=0)  # the tiny model is under the default gate


def _passes(split=FORCED):
    return [split if p is P.async_tp else p for p in fxpar.default_passes()]


def _count(pm, target) -> int:
    return sum(n.target is target for n in pm.graph_module.graph.nodes)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _comms(pm, ids, target):
    with fxpar.count_comms() as records:
        pm.zero_grad(set_to_none=True)
        loss = pm.step(ids, target=target, loss_fn=cross_entropy)
    bytes_ = collections.Counter()
    calls = collections.Counter()
    for r in records:
        bytes_[r.direction, r.op] += r.nbytes
        calls[r.direction, r.op] += 1
    return loss, bytes_, calls


def _split_vs_unsplit(plan_kwargs):
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = build(TINY).double()
    ids, target = batch(TINY)
    plan = fxpar.Plan(**plan_kwargs) if plan_kwargs else None
    split = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan, passes=_passes(), check=True)
    plain = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan, overlap=False)
    fxpar.check(split)
    out = {"starts": _count(split, START), "waits": _count(split, WAIT_OP), "left": _count(split, ALL_REDUCE),
           "unsplit": _count(plain, ALL_REDUCE),
           "sp_starts": (_count(split, AG_START), _count(split, RS_START)),
           "sp_left": (_count(split, SP_AG), _count(split, RS)), "sp_unsplit": (_count(plain, SP_AG), _count(plain, RS))}
    with torch.no_grad():
        ref = model(ids)
        out["fwd"] = _rel(split(ids), ref)
        out["fwd_vs_unsplit"] = _rel(split(ids), plain(ids))
        for b in (1, 3):  # an empty first chunk, and unequal chunks
            out[f"fwd_batch{b}"] = _rel(split(ids[:b]), model(ids[:b]))
    model.zero_grad(set_to_none=True)
    ref_loss = cross_entropy(model(ids), target)
    ref_loss.backward()
    loss_s, bytes_s, calls_s = _comms(split, ids, target)
    grads_s = split.full_grads()
    loss_p, bytes_p, calls_p = _comms(plain, ids, target)
    out["loss"] = abs(float(loss_s.detach() - ref_loss.detach())) / abs(float(ref_loss))
    out["loss_vs_unsplit"] = abs(float(loss_s.detach() - loss_p.detach()))
    # relative to the largest gradient: k_proj's bias has a zero gradient (softmax ignores a shift of the
    # keys), computed as rounding noise on both sides
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    out["grads"] = max(float((grads_s[k] - p.grad).abs().max()) / scale for k, p in model.named_parameters())
    out["n_grads"] = len(grads_s)
    out["bytes"] = (dict(bytes_s), dict(bytes_p))
    out["calls"] = (dict(calls_s), dict(calls_p))
    sched = collective_schedule(split.graph_module, MeshInfo.from_device_mesh(mesh))
    keys = [s.key() for s in sched]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, keys)
    out["same_order"] = all(k == keys for k in everyone)
    out["fwd_all_reduces"] = sum(s.direction == "forward" and s.op == "all_reduce" for s in sched)
    out["explain"] = [ln for ln in split.explain().splitlines() if "_start_" in ln and "issued at %" in ln]
    gm = split.graph_module
    gm.graph.eliminate_dead_code()  # issued collectives are side-effecting: dead-code elimination keeps them
    out["after_dce"] = (_count(split, START) + _count(split, AG_START) + _count(split, RS_START),
                        _count(split, WAIT_OP))
    return out


def test_split_is_exact_and_communicates_the_same_bytes():
    for r in rank_pool(2).run(_split_vs_unsplit, None):
        # 1 embedding + 2 per block all-reduces, each issued once per chunk, none left waiting inside an op
        assert r["unsplit"] == 5 and r["starts"] == r["waits"] == 10 and r["left"] == 0, r
        assert r["fwd"] < 1e-10 and r["fwd_vs_unsplit"] < 1e-10, r
        assert r["fwd_batch1"] < 1e-10 and r["fwd_batch3"] < 1e-10, r
        assert r["loss"] < 1e-10 and r["loss_vs_unsplit"] < 1e-12, r
        assert r["n_grads"] > 0 and r["grads"] < 1e-10, r
        split_bytes, plain_bytes = r["bytes"]
        assert split_bytes == plain_bytes, r["bytes"]  # the same bytes, in chunks
        split_calls, plain_calls = r["calls"]
        assert split_calls["forward", "all_reduce"] == 2 * plain_calls["forward", "all_reduce"], r["calls"]
        assert r["same_order"] and r["fwd_all_reduces"] == 10 and r["after_dce"] == (10, 10), r
        assert len(r["explain"]) == 10 and all("overlaps" in ln and "overlaps 0 ops" not in ln
                                               for ln in r["explain"][1:]), r["explain"]


def test_sequence_parallel_gathers_and_scatters_are_issued_and_exact():
    for r in rank_pool(2).run(_split_vs_unsplit, SP):
        # unsplit: a reduce-scatter after the embedding and each row-parallel matmul (5), a gather before each
        # block's attention and MLP and the final norm's lm_head (5); each issued once per chunk, none left
        # waiting inside an op (the logits' all_gather at the end stays one call on the whole batch)
        assert r["unsplit"] == 0 and r["starts"] == 0 and r["sp_unsplit"] == (5, 5), r
        assert r["sp_starts"] == (10, 10) and r["waits"] == 20 and r["sp_left"] == (0, 0), r
        assert r["fwd"] < 1e-10 and r["fwd_vs_unsplit"] < 1e-10, r
        assert r["fwd_batch1"] < 1e-10 and r["fwd_batch3"] < 1e-10, r
        assert r["loss"] < 1e-10 and r["loss_vs_unsplit"] < 1e-12, r
        assert r["n_grads"] > 0 and r["grads"] < 1e-10, r
        split_bytes, plain_bytes = r["bytes"]
        assert split_bytes == plain_bytes, r["bytes"]  # the same bytes, in chunks, forward and backward
        split_calls, plain_calls = r["calls"]
        assert split_calls["forward", "reduce_scatter"] == 2 * plain_calls["forward", "reduce_scatter"] == 10, r
        assert split_calls["forward", "all_gather"] == 2 * plain_calls["forward", "all_gather"] - 1 == 11, r
        assert split_calls["backward", "reduce_scatter"] == 2 * plain_calls["backward", "reduce_scatter"], r
        assert r["same_order"] and r["after_dce"] == (20, 20), r
        assert len(r["explain"]) == 20 and all("overlaps" in ln and "overlaps 0 ops" not in ln
                                               for ln in r["explain"]), r["explain"]
        assert sum("sp_all_gather(tp)" in ln for ln in r["explain"]) == 10, r["explain"]


def _issued_vs_waiting(spin_ms):
    """Each issued collective against the one that waits inside itself, along dims 0, 1 and 2: values and
    gradients, with and without polled waits (`fxpar.ops.waiting`)."""
    import os

    before = os.environ.get("FXPAR_WAIT_SPIN_MS")
    os.environ["FXPAR_WAIT_SPIN_MS"] = str(spin_ms)  # read on each wait; the pool's ranks serve later tests too
    try:
        return _issued_vs_waiting_here()
    finally:
        if before is None:
            os.environ.pop("FXPAR_WAIT_SPIN_MS")
        else:
            os.environ["FXPAR_WAIT_SPIN_MS"] = before


def _issued_vs_waiting_here():
    from fxpar.ops.async_tp import wait_issued

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    group = mesh.get_group(0).group_name
    torch.manual_seed(dist.get_rank())
    fx = torch.ops.fxpar
    worst = 0.0
    for dim in (0, 1, 2):
        for sync, issued, shape in ((fx.sp_all_gather, fx.sp_all_gather_start, (3, 4, 5)),
                                    (fx.reduce_scatter, fx.reduce_scatter_start, (4, 6, 8))):
            x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
            a = sync(x, dim, 2, group, "tp")
            b = wait_issued(issued(x, dim, 2, group, "tp"))
            w = torch.randn_like(a)
            ga, = torch.autograd.grad((a * w).sum(), x)
            gb, = torch.autograd.grad((b * w).sum(), x)
            assert a.shape == b.shape, (a.shape, b.shape)
            worst = max(worst, float((a - b).abs().max()), float((ga - gb).abs().max()))
    return worst


@pytest.mark.parametrize("spin_ms", [0, 5])
def test_issued_sp_collectives_equal_the_waiting_ones(spin_ms):
    assert rank_pool(2).run(_issued_vs_waiting, spin_ms) == [0.0, 0.0]


def _planted_bug(plan=None, issue="all_reduce_start"):
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = build(TINY).double()
    ids, _ = batch(TINY)
    pm = fxpar.parallelize(model, mesh, example_inputs=(ids,), plan=plan, passes=_passes())
    graph = pm.graph_module.graph
    issue = getattr(torch.ops.fxpar, issue).default
    wait = next(n for n in graph.nodes if n.target is WAIT_OP and n.args[0].target is issue)
    user = next(iter(wait.users))
    user.replace_input_with(wait, wait.args[0])  # reads the sum still in flight: the wait moved after a use
    try:
        fxpar.check(pm)
    except fxpar.GraphInvariantError as e:
        return str(e), user.name
    return None, user.name


@pytest.mark.parametrize("plan,issue", [(None, "all_reduce_start"), (SP, "sp_all_gather_start"),
                                        (SP, "reduce_scatter_start")],
                         ids=["all_reduce", "sp_all_gather", "reduce_scatter"])
def test_check_catches_a_value_read_before_its_wait(plan, issue):
    for msg, user in rank_pool(2).run(_planted_bug, fxpar.Plan(**plan) if plan else None, issue):
        assert msg is not None and f"%{user}" in msg and "in flight" in msg, msg


def _gate_and_switches():
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    model = build(TINY).double()
    ids, _ = batch(TINY)
    return {
        "default": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,)), START),
        "default_gate": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,), passes=_passes(P.AsyncTP())),
                               START),
        "overlap_false": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,), passes=_passes(),
                                                  overlap=False), START),
        "compiled": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,), passes=_passes(),
                                             compile="aot_eager"), START),
        "forced": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,), passes=_passes()), START),
        "one_chunk": _count(fxpar.parallelize(model, mesh, example_inputs=(ids,),
                                              passes=_passes(P.AsyncTP(chunks=1, min_chunk_bytes=0,
                                                                       min_chunk_flops=0))), START),
    }


def test_gate_and_switches():
    for r in rank_pool(2).run(_gate_and_switches):
        # default pipeline: off; AsyncTP()'s gate: 4 x 16 tokens of width 64 are 4 KiB chunks, under
        # min_chunk_bytes, not worth splitting
        assert r == {"default": 0, "default_gate": 0, "overlap_false": 0, "compiled": 0, "forced": 10,
                     "one_chunk": 0}, r


def _benchmark_size_is_split():
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    cfg = ModelConfig("gpt2", layers=2, dim=256, heads=8, hidden=1024, vocab=1024, batch=8, seq=128)
    ids = batch(cfg)[0]
    on = fxpar.parallelize(build(cfg), mesh, example_inputs=(ids,), passes=_passes(P.AsyncTP()))
    default = fxpar.parallelize(build(cfg), mesh, example_inputs=(ids,))
    return _count(on, START), _count(default, START)


def test_default_gate_splits_the_benchmark_size():
    # benchmarks/overlap.py's GPT (here 2 of its 4 blocks): 512 KiB all-reduce chunks, 30+ MFLOP per chunk
    # stage, split by AsyncTP()'s default gate; the default pipeline leaves it unsplit (async_tp is off)
    assert rank_pool(2).run(_benchmark_size_is_split) == [(10, 0), (10, 0)]


class BatchCoupled(torch.nn.Module):
    """A Megatron MLP, a step that mixes the rows of the batch, another Megatron MLP."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.up1, self.down1 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)
        self.up2, self.down2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = x + self.down1(torch.nn.functional.gelu(self.up1(x)))
        h = h - h.mean(0, keepdim=True)  # couples the rows: the split must end here
        return h + self.down2(torch.nn.functional.gelu(self.up2(h)))


def _batch_coupled():
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    model = BatchCoupled().double()
    x, y = torch.randn(6, 5, 16, dtype=torch.float64), torch.randn(6, 5, 16, dtype=torch.float64)
    plan = {"up*": "colwise", "down*": "rowwise"}
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=plan, passes=_passes(), check=True)
    fxpar.check(pm)
    report = fxpar.verify(model, pm, x, target=y, loss_fn=torch.nn.functional.mse_loss, rtol=1e-10, atol=1e-12)
    return _count(pm, START), _count(pm, ALL_REDUCE), report.ok, str(report.worst)


def test_rows_mixed_by_an_op_end_the_split():
    for starts, left, ok, worst in rank_pool(2).run(_batch_coupled):
        assert starts == 2 and left == 1 and ok, (starts, left, worst)  # the first MLP split, the second not


def test_ranks_agree_statically_and_a_rank_with_another_order_is_caught():
    from fxpar.testing.simulate import SimWorld

    world = SimWorld({"tp": 2})
    model = build(TINY).double()
    ids, _ = batch(TINY)
    pms = world.parallelize(model, example_inputs=(ids,), passes=_passes())
    assert [_count(pm, START) for pm in pms] == [10, 10]
    fxpar.check(pms[0], ranks=pms)  # the same collectives in the same order on every rank, without running
    with torch.no_grad():
        ref = model(ids)
        assert all(_rel(out, ref) < 1e-10 for out in world.run(lambda r: pms[r](ids)))
    starts = [n for n in pms[1].graph_module.graph.nodes if n.target is START]
    starts[3].append(starts[2])  # rank 1 issues chunk 1's all-reduce before chunk 0's
    pms[1].graph_module.recompile()
    with pytest.raises(fxpar.GraphInvariantError, match="issue different collectives") as e:
        fxpar.check(pms[0], ranks=pms)
    assert "allreduce_start_linear_3_nobias_c0" in str(e.value), str(e.value)


def _dp_tp_local():
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = build(TINY).double()
    ids, target = batch(TINY)
    dp = mesh.get_local_rank("dp")
    local_ids, local_target = ids.chunk(2)[dp], target.chunk(2)[dp]
    kw = dict(example_inputs=(local_ids,), input_layout="local")
    split = fxpar.parallelize(model, mesh, passes=_passes(), check=True, **kw)
    plain = fxpar.parallelize(model, mesh, overlap=False, **kw)
    fxpar.check(split)
    model.zero_grad(set_to_none=True)
    ref = cross_entropy(model(ids), target)
    ref.backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters())
    out = {"starts": _count(split, START)}
    for name, pm in (("split", split), ("plain", plain)):
        pm.zero_grad(set_to_none=True)
        loss = pm.step(local_ids, target=local_target, loss_fn=cross_entropy)
        grads = pm.full_grads()
        out[name] = (abs(float(loss.detach() - ref.detach())) / abs(float(ref)),
                     max(float((grads[k] - p.grad).abs().max()) / scale for k, p in model.named_parameters()))
    return out


def test_dp2_x_tp2_local_batches_are_exact():
    for r in rank_pool(4).run(_dp_tp_local):
        # Not split yet: the FakeTensor run of a chunk gives the embedding sum a constant row count on
        # dp x tp, and the pass declines (its shape check) rather than guess; exact either way.
        assert r["starts"] == 0, r
        assert r["plain"][0] < 1e-10 and r["plain"][1] < 1e-10, r
        assert r["split"][0] < 1e-10 and r["split"][1] < 1e-10, r
