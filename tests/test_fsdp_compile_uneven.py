"""Compiled FSDP with uneven shards, and a rank that never joins a collective: an error naming it, never a hang.

Uneven units (a dim 0 the fsdp size does not divide) are lowered like even ones: every rank's shard enters
the compiled graph padded to ceil(rows / n) rows (`fxpar.ops.traceable_fsdp.pad_uneven_shards`), so every rank
compiles the same graph. Before, rank 0 (whole rows, no pad) and rank 1 (a pad in its graph) got different
graphs: AOT's partitioner re-gathered a block in one rank's backward and saved it in the other's, and the
ranks waited in different collectives (a reduce-scatter against an all-gather) until the timeout.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.ops.traceable import traceable_graph_module
from fxpar.ops.traceable_fsdp import (_GATHER, fsdp_gather_unit, fsdp_units_of, padded_uneven_shards,
                                      traceable_fsdp_graph_module)
from fxpar.testing import RankError, rank_pool
from fxpar.testing.dist import describe_stack, set_collective_timeout
from tests.models import BlockStack, Chain, mse
from tests.test_fsdp_compile import _compiled_vs_eager_vs_unsplit


def _lowering(shape, names) -> dict:
    """This rank's lowered graph: its uneven gathers, what reads the padded shards, and their shapes."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", shape, mesh_dim_names=names)
    torch.manual_seed(0)
    model = BlockStack(2, 15, 32).double()  # 15 rows (norms, down projections) on fsdp=2: 8 + 7
    x = torch.randn(4, 8, 15, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,))
    gm = pm.graph_module
    uneven = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _GATHER and _full_size(n) >= 0]
    lowered = traceable_fsdp_graph_module(traceable_graph_module(gm))
    padded = lowered.meta.get("fxpar_fsdp_padded", [])
    reads = {str(n.target): [u.target for u in n.users] for n in lowered.graph.nodes if n.op == "get_attr"}
    with torch.no_grad(), padded_uneven_shards(lowered):
        shapes = {name: tuple(getattr(lowered, name).shape) for name, _, _ in padded}
        exact = torch.equal(lowered(x), gm(x))  # eager: the lowered graph with its collectives, as gm's
    outside = [hasattr(lowered, name) for name, _, _ in padded]  # removed on exit: no stale shard is read
    return {"uneven": len(uneven), "units": len(fsdp_units_of(gm.graph)), "exact": exact, "outside": outside,
            "left": sum(n.target is _GATHER for n in lowered.graph.nodes),
            "padded": [(name, shard, rows) for name, shard, rows in padded],
            "padded_shapes": shapes,
            "shard_shapes": {shard: tuple(gm.get_parameter(shard).shape) for _, shard, _ in padded},
            "read_by_unit": all(reads[name] == [fsdp_gather_unit] for name, _, _ in padded)}


def _full_size(node) -> int:
    for i, a in enumerate(node.target._schema.arguments):
        if a.name == "full_size":
            return node.args[i] if i < len(node.args) else node.kwargs.get("full_size", a.default_value)
    return -1


@pytest.mark.parametrize("shape,names", [((2,), ("fsdp",)), ((2, 2), ("fsdp", "tp"))], ids=["fsdp2", "fsdp2xtp2"])
def test_uneven_units_are_lowered_with_padded_shards(shape, names):
    results = rank_pool(len(names) * 2).run(_lowering, shape, names)
    for rank, r in enumerate(results):
        fsdp_rank = rank // (len(results) // 2)  # the fsdp coordinate: 8 rows on the first, 7 on the second
        assert r["uneven"] > 0 and r["left"] == 0, r  # every uneven gather lowered: nothing left opaque
        assert r["padded"] == results[0]["padded"] and len(r["padded"]) == r["uneven"], r
        assert all(rows == 8 for _, _, rows in r["padded"]), r
        # the same shape on every rank (what the compiled graph sees); the shards' own rows differ
        assert r["padded_shapes"] == results[0]["padded_shapes"], r
        assert all(s[0] == 8 for s in r["padded_shapes"].values()), r
        assert {s[0] for s in r["shard_shapes"].values()} == {8 - fsdp_rank}, r
        assert r["read_by_unit"] and r["exact"] and not any(r["outside"]), r


@pytest.mark.parametrize("shape,names,backend", [
    ((2,), ("fsdp",), "aot_eager"),
    pytest.param((2,), ("fsdp",), True, marks=pytest.mark.slow),  # inductor: about a minute
    pytest.param((2, 2), ("fsdp", "tp"), True, marks=pytest.mark.slow),  # inductor on 4 ranks: minutes
], ids=["fsdp2-aot_eager", "fsdp2-inductor", "fsdp2xtp2-inductor"])
def test_uneven_compiled_equals_eager_and_unsplit(shape, names, backend):
    """Loss and every gradient in float64 against eager fsdp and the unsplit model; under inductor, every
    rank of each group compiled the same collective order (check_compiled_order raises otherwise)."""
    world = shape[0] * (shape[1] if len(shape) > 1 else 1)
    for r in rank_pool(world).run(_compiled_vs_eager_vs_unsplit, shape, names, backend, 15, False,
                                          timeout=900):
        assert r["lowered"] > 0 and r["keys"], r
        # (inductor's fused kernels round differently from eager's: equal to 1e-12, not bit for bit)
        assert all(abs(loss - r["ref"]) <= 1e-12 * abs(r["ref"]) for loss in r["losses"]), r
        assert r["vs_eager"] <= 1e-10 and r["vs_unsplit"] <= 1e-10, r
        assert backend is not True or r["compiled_collectives"] >= 3 * r["lowered"], r


# --------------------------------------------------------------------------- a rank that never joins


def _skip_a_step(compile_: bool, stamp: str) -> float:
    """Two steps on fsdp=2; rank 1 returns before the second (never joins its collectives)."""
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("fsdp",))
    torch.manual_seed(0)
    model = Chain([6, 7, 5, 4]).double()  # 7 and 5 rows: uneven on fsdp=2
    x, t = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), compile=compile_)
    pm.step(x, target=t, loss_fn=mse)  # both ranks (and, compiled, every graph compiled)
    set_collective_timeout(3.0)  # from here on a collective waits 3 s for the other rank
    dist.barrier()
    if dist.get_rank() == 1:
        return 0.0
    with open(stamp, "w") as f:
        f.write(repr(time.monotonic()))
    pm.step(x, target=t, loss_fn=mse)  # rank 0 waits in its first collective
    return 1.0


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "inductor"])
def test_rank_that_skips_a_step_is_named_within_the_timeout(compile_, tmp_path):
    stamp = str(tmp_path / "planted")
    with pytest.raises(RankError) as info:
        rank_pool(2).run(_skip_a_step, compile_, stamp, timeout=600)
    waited = time.monotonic() - float(open(stamp).read())
    msg = str(info.value)
    assert waited < 3.0 + 10.0, waited  # the collective timeout, the driver's grace for the reply, slack
    assert info.value.failed_ranks == [0], msg
    assert "rank 0:" in msg and "imed out" in msg and "waiting in collective" in msg, msg
    assert "ranks [1] returned normally" in msg and "ranks [1] skipped it" in msg, msg
    if compile_:  # the functional collective of the compiled graph, named from its generated code
        assert "in a compiled graph" in msg and "_gather_into_tensor(" in msg, msg


def _stuck(rank_in_c: int) -> None:
    """Rank `rank_in_c` waits in an all-reduce the other rank never issues; the other sleeps."""
    if dist.get_rank() == rank_in_c:
        dist.all_reduce(torch.ones(3))
    else:
        time.sleep(60)


def test_driver_deadline_names_each_rank_and_where_it_is():
    """No rank answers (the collective's own timeout is longer than the run's): at the run's deadline the
    driver asks each rank for its stack and names the collective it is in, then kills the ranks."""
    start = time.monotonic()
    with pytest.raises(RankError) as info:
        rank_pool(2).run(_stuck, 0, timeout=2, collective_timeout=60)
    msg = str(info.value)
    assert time.monotonic() - start < 2 + 5 + 5, msg  # timeout, DEADLINE_GRACE, the stack dump and slack
    assert info.value.missing_ranks == [0, 1], msg
    assert "rank 0 was waiting in collective all_reduce" in msg and "_stuck" in msg, msg
    assert "rank 1 was not in a collective: in sleep" in msg or "rank 1 was not in a collective" in msg, msg


def test_describe_stack_names_a_compiled_collective(tmp_path):
    code = tmp_path / "torchinductor_x.py"
    code.write_text("def call(args):\n"
                    "    buf3 = torch.ops._c10d_functional.all_gather_into_tensor.default(buf2, 2, '0')\n"
                    "    x = 1\n"
                    "    torch.ops._c10d_functional.wait_tensor.default(buf3)\n")
    dump = ("Thread 0x1 (most recent call first):\n"
            "  File \"/x/threading.py\", line 1 in run\n\n"
            "Current thread 0x2 (most recent call first):\n"
            f"  File \"{code}\", line 4 in call\n"
            "  File \"/s/site-packages/torch/_inductor/output_code.py\", line 763 in __call__\n"
            "  File \"/w/fxpar/runtime/parallel_module.py\", line 338 in step\n"
            "  File \"/w/fxpar/testing/dist.py\", line 168 in _worker_main\n")
    assert describe_stack(dump) == (f"waiting in collective wait_tensor of all_gather_into_tensor(buf2, 2, '0') "
                                    f"in a compiled graph ({code}:4), called from step "
                                    "(/w/fxpar/runtime/parallel_module.py:338)")
    assert describe_stack("Thread 0x1:\n  File \"a.py\", line 1 in f\n") == "busy (no stack dump)"
