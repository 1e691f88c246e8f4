"""shard_inputs: tensor inputs split along the batch over dp / fsdp, by a local `shard` node (no communication)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor.placement_types import Replicate, Shard

import fxpar
from fxpar.core.spec import get_info, get_spec
from pass_harness import Fn, Fn2, calls, guard_calls, placeholder, position, run_upto

SHARD = torch.ops.fxpar.shard.default


def _two_inputs(x, y):
    return x * 2 + y


def _non_guard_users(n):
    return [u for u in n.users if u not in guard_calls(n.graph.owning_module)]


def test_one_shard_per_input_right_after_its_placeholder_feeds_every_use():
    x, y = torch.randn(4, 8), torch.randn(4, 8)
    gm = run_upto("shard_inputs", Fn2(_two_inputs), (x, y), {"dp": 2, "tp": 2}, dynamic=False)
    shards = calls(gm, SHARD)
    assert len(shards) == 2
    pos = position(gm)
    for name, shard in zip(("x", "y"), shards):
        ph = placeholder(gm, name)
        # a local slice of dim 0 over the dp group (size 2): (input, dim, group size, group, mesh dim)
        assert shard.args == (ph, 0, 2, "dryrun:dp", "dp")
        assert pos[shard] == pos[ph] + 1
        # the computation reads the slice, never the full input
        assert _non_guard_users(ph) == [shard]
    mul = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.mul.Tensor)
    assert mul.args[0] is shards[0]


def test_specs_full_batch_on_the_placeholder_local_rows_on_the_shard():
    gm = run_upto("shard_inputs", Fn2(_two_inputs), (torch.randn(4, 8), torch.randn(4, 8)), {"dp": 2, "tp": 2},
                  dynamic=False)
    x = placeholder(gm, "x")
    (shard,) = [s for s in calls(gm, SHARD) if s.args[0] is x]
    info = get_info(x)
    assert info.role == "input" and info.origin == "shard_inputs"
    assert info.spec.placements == (Replicate(), Replicate()) and info.spec.local_shape == (4, 8)
    spec = get_spec(shard)
    assert spec.placements == (Shard(0), Replicate())
    assert spec.shape == (4, 8) and spec.local_shape == (2, 8)
    assert tuple(shard.meta["val"].shape) == spec.shape  # meta["val"] stays global


def test_dp_and_fsdp_cut_the_batch_in_mesh_order():
    gm = run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(8, 3),), {"dp": 2, "fsdp": 2, "tp": 2},
                  dynamic=False)
    first, second = calls(gm, SHARD)
    assert first.args == (placeholder(gm, "x"), 0, 2, "dryrun:dp", "dp")
    assert second.args == (first, 0, 2, "dryrun:fsdp", "fsdp")
    assert get_spec(first).placements == (Shard(0), Replicate(), Replicate())
    assert get_spec(second).placements == (Shard(0), Shard(0), Replicate())
    assert get_spec(second).local_shape == (2, 3)  # 8 rows over dp x fsdp = 4 ranks
    add = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.add.Tensor)
    assert add.args[0] is second


def test_group_size_is_the_data_dims_size_not_the_world():
    gm = run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(8, 3),), {"dp": 4, "tp": 2}, dynamic=False)
    (shard,) = calls(gm, SHARD)
    assert shard.args[2] == 4 and get_spec(shard).local_shape == (2, 3)


def test_without_a_data_parallel_dim_inputs_stay_replicated_and_nothing_is_inserted():
    gm = run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(4, 3),), {"tp": 4}, dynamic=False)
    assert calls(gm, SHARD) == []
    assert get_spec(placeholder(gm, "x")).placements == (Replicate(),)


def test_dp_of_size_one_is_not_a_data_parallel_dim():
    gm = run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(3, 3),), {"dp": 1, "tp": 2}, dynamic=False)
    assert calls(gm, SHARD) == []


def test_local_layout_marks_the_placeholder_sharded_and_inserts_nothing():
    gm = run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(4, 3),), {"dp": 2, "tp": 2}, dynamic=False,
                  input_layout="local")
    assert calls(gm, SHARD) == []
    spec = get_spec(placeholder(gm, "x"))
    assert spec.placements == (Shard(0), Replicate())


def test_zero_dim_inputs_have_no_batch_and_stay_replicated():
    gm = run_upto("shard_inputs", Fn2(lambda x, y: x * y), (torch.randn(4, 3), torch.tensor(2.0)),
                  {"dp": 2}, dynamic=False)
    assert [n.args[0].name for n in calls(gm, SHARD)] == ["x"]
    assert get_spec(placeholder(gm, "y")).placements == (Replicate(),)


def test_shards_survive_dead_code_elimination_even_unused():
    gm = run_upto("shard_inputs", Fn2(_two_inputs), (torch.randn(4, 8), torch.randn(4, 8)), {"dp": 2},
                  dynamic=False)
    gm.graph.eliminate_dead_code()
    assert len(calls(gm, SHARD)) == 2
    # with every use pointed back at the full input, the slices compute nothing anyone reads;
    # all ranks must still issue them (their backward gathers the input gradient)
    for shard in calls(gm, SHARD):
        shard.replace_all_uses_with(shard.args[0])
    gm.graph.eliminate_dead_code()
    assert len(calls(gm, SHARD)) == 2


def test_batch_that_does_not_divide_is_a_sharding_error():
    with pytest.raises(fxpar.ShardingError, match=r"\[shard_inputs\].*batch \(6\) does not divide by the "
                                                  r"data-parallel size 4 \(dp, fsdp\)"):
        run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(6, 3),), {"dp": 2, "fsdp": 2}, dynamic=False)


def test_unknown_input_layout_is_a_plan_error():
    with pytest.raises(fxpar.PlanError, match="input_layout='sharded'"):
        run_upto("shard_inputs", Fn(lambda x: x + 1), (torch.randn(4, 3),), {"dp": 2}, input_layout="sharded")


class _FixedBatch(nn.Module):
    """A model whose capture pins the batch size (its guard checks the global batch, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(x.reshape(4, 16))


def test_the_captures_input_guard_still_reads_the_full_input():
    # The guard checks the shapes the user passes (the global batch): fed this rank's slice it fails
    # at run time ('Guard failed: x.size()[1] * x.size()[0] == 64') on every dp / fsdp mesh.
    gm = run_upto("shard_inputs", _FixedBatch(), (torch.randn(4, 16),), {"dp": 2})
    (guard,) = guard_calls(gm)
    assert guard.args == (placeholder(gm, "x"),)


def test_a_fixed_batch_model_runs_data_parallel(make_fake_mesh):
    # The same bug seen from the user's side, on torch's fake backend (rank 0 of dp=2).
    mesh = make_fake_mesh((2,), ("dp",))
    pm = fxpar.parallelize(_FixedBatch(), mesh, example_inputs=(torch.randn(4, 16),))
    assert pm(torch.randn(4, 16)).shape == (4, 16)
