"""apply_fsdp: parameters stored as Shard(0) on fsdp, gathered by fsdp_all_gather right before their first use."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.distributed.tensor.placement_types import Replicate, Shard

import fxpar
from fxpar.core.errors import module_fqn_of
from fxpar.core.spec import FSDP_ROOT_UNIT, get_info, get_spec
from models import MLPBlock
from pass_harness import calls, param, position, run_upto

GATHER = torch.ops.fxpar.fsdp_all_gather.default
MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
MESH = {"fsdp": 2, "tp": 2}
FSDP, TP = 0, 1


class Model(nn.Module):
    """Two Megatron blocks, a root-level head that shards, one that cannot, a frozen one and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLPBlock(16, 32) for _ in range(2)])
        self.head = nn.Linear(16, 4)
        self.odd = nn.Linear(16, 3)    # 3 rows: not divisible by fsdp=2, sharded unevenly (2 + 1)
        self.frozen = nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.ones(16))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        x = self.frozen(x * self.scale)
        return self.head(x).sum(-1) + self.odd(x).sum(-1)


SHARDED = [f"layers.{i}.{m}.{p}" for i in range(2) for m in ("up", "down") for p in ("weight", "bias")] + \
    ["head.weight", "head.bias", "odd.weight", "odd.bias"]
UNEVEN = {"odd.weight", "odd.bias"}


def _run(upto="apply_fsdp", mesh=MESH, **options):
    return run_upto(upto, Model(), (torch.randn(4, 16),), mesh, MEGATRON, dynamic=False, **options)


def test_one_gather_per_shardable_parameter_on_the_fsdp_group():
    gm = _run()
    gathers = calls(gm, GATHER)
    assert sorted(str(g.args[0].target) for g in gathers) == sorted(SHARDED)
    for g in gathers:
        # (shard, dim, group size, group, mesh dim[, param dtype, reduce dtype, rows of an uneven shard])
        uneven = str(g.args[0].target) in UNEVEN
        assert g.args[1:] == ((0, 2, "dryrun:fsdp", "fsdp", None, None, 3) if uneven else (0, 2, "dryrun:fsdp", "fsdp"))
        assert g.name == f"fsdpgather_{g.args[0].name}"
        # the stored shard feeds nothing but its gather
        assert list(g.args[0].users) == [g]


def test_each_gather_sits_just_before_its_parameters_first_use():
    gm = _run()
    pos = position(gm)
    order = list(gm.graph.nodes)
    root = [g for g in calls(gm, GATHER) if get_info(g).fsdp_bucket == FSDP_ROOT_UNIT]
    for g in calls(gm, GATHER):
        # the root unit's gathers sit together, before the first use of any of them (one collective)
        first_use = min((u for r in (root if g in root else [g]) for u in r.users), key=pos.__getitem__)
        between = order[pos[g] + 1: pos[first_use]]
        assert all(n.target == GATHER for n in between), (g.name, [n.name for n in between])
    # so a block's parameters are gathered only once the previous block has run
    layer0 = [n for n in order if n.op == "call_function" and module_fqn_of(n).startswith("layers.0")
              and n.target != GATHER]
    layer1 = [g for g in calls(gm, GATHER) if str(g.args[0].target).startswith("layers.1.")]
    assert layer0 and len(layer1) == 4
    assert min(pos[g] for g in layer1) > max(pos[n] for n in layer0)


def test_specs_shard_is_one_over_fsdp_of_the_tensor_parallel_shard_and_the_gather_rebuilds_it():
    before = _run("annotate_parameters")
    gm = _run()
    for g in calls(gm, GATHER):
        p = g.args[0]
        tp_local = get_spec(param(before, str(p.target)))
        stored, gathered = get_spec(p), get_spec(g)
        assert stored.placements[FSDP] == Shard(0) and stored.placements[TP] == tp_local.placements[TP]
        assert stored.shape == tp_local.shape
        # 1/fsdp of the rows; an uneven shard's spec holds the padded ceil(rows / fsdp)
        assert stored.local_shape == (-(-tp_local.local_shape[0] // 2), *tp_local.local_shape[1:])
        assert gathered == tp_local  # the gather yields exactly this rank's tensor-parallel shard
        info = get_info(g)
        assert (info.role, info.param_fqn, info.origin) == ("param", get_info(p).param_fqn, "apply_fsdp")
        assert tuple(g.meta["val"].shape) == tp_local.shape


def test_block_unit_buckets_gathers_by_block_and_the_rest_as_the_root_unit():
    gm = _run()
    buckets = {str(g.args[0].target): get_info(g).fsdp_bucket for g in calls(gm, GATHER)}
    # the modules outside the blocks are FSDP2's root unit (fully_shard per block, then the model)
    assert buckets == {fqn: fqn.rsplit(".", 2)[0] if fqn.startswith("layers.") else FSDP_ROOT_UNIT
                       for fqn in SHARDED}


class NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_without_blocks_each_module_is_its_own_unit():
    """The root unit forms beside blocks only (FSDP2's fully_shard per block, then the root): a model with
    none keeps a unit per module instead of holding all its parameters gathered through the step."""
    gm = run_upto("apply_fsdp", NoBlocks(), (torch.randn(4, 16),), {"fsdp": 2}, None, dynamic=False)
    assert {str(g.args[0].target): get_info(g).fsdp_bucket for g in calls(gm, GATHER)} == {
        "fc1.weight": "fc1", "fc1.bias": "fc1", "fc2.weight": "fc2", "fc2.bias": "fc2"}


def test_param_unit_gathers_each_parameter_on_its_own():
    gm = _run(fsdp_unit="param")
    assert len(calls(gm, GATHER)) == len(SHARDED)
    assert {get_info(g).fsdp_bucket for g in calls(gm, GATHER)} == {None}


def test_parameters_whose_rows_do_not_divide_are_sharded_unevenly_and_say_so():
    gm = _run()
    for fqn in ("odd.weight", "odd.bias"):
        p = param(gm, fqn)
        (g,) = p.users
        assert g.target is GATHER and g.meta["val"].shape[0] == 3  # the gather rebuilds the 3 real rows
        spec = get_spec(p)
        assert spec.placements == (Shard(0), Replicate()) and spec.local_shape[0] == 2  # padded: ceil(3 / 2)
        assert "fsdp shards dim 0 unevenly: 3 rows in chunks of 2 over fsdp=2" in get_info(p).style


def test_unevenness_is_judged_on_the_tensor_parallel_shard():
    # 6 rows divide by fsdp=2, but tp=2 leaves each rank 3 rows of 0.weight: an uneven fsdp cut of 3 rows;
    # 5 rows on tp=2 are themselves uneven (3 + 2): rows that differ by rank stay replicated on fsdp
    model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    gm = run_upto("apply_fsdp", model, (torch.randn(4, 16),), MESH, {"0": "colwise", "2": "rowwise", "4": "colwise"},
                  dynamic=False)
    gathered = {str(g.args[0].target): g for g in calls(gm, GATHER)}
    assert gathered["0.weight"].args[7] == 3 and len(gathered["2.weight"].args) == 5
    assert "4.weight" not in gathered
    assert "dim 0 is cut unevenly by another mesh dim (5 rows)" in get_info(param(gm, "4.weight")).style


def test_frozen_parameters_and_buffers_are_not_sharded():
    gm = _run()
    for fqn in ("frozen.weight", "frozen.bias", "scale"):
        p = param(gm, fqn)
        assert all(u.target != GATHER for u in p.users)
        assert get_spec(p).placements[FSDP] == Replicate()


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"dp": 2, "tp": 2}, {"fsdp": 1, "tp": 2}])
def test_without_an_fsdp_dim_nothing_changes(mesh):
    gm = _run(mesh=mesh)
    assert calls(gm, GATHER) == []
    assert all(p.is_replicate() for p in get_spec(param(gm, "head.weight")).placements)


def test_gathers_survive_dead_code_elimination_even_unused():
    gm = _run()
    n = len(calls(gm, GATHER))
    gm.graph.eliminate_dead_code()
    assert len(calls(gm, GATHER)) == n
    # every rank of the group must issue every gather, whether or not this rank reads it
    for g in calls(gm, GATHER):
        g.replace_all_uses_with(g.args[0])
    gm.graph.eliminate_dead_code()
    assert len(calls(gm, GATHER)) == n


def test_unknown_fsdp_unit_is_a_plan_error():
    with pytest.raises(fxpar.PlanError, match=r"\[apply_fsdp\] fsdp_unit='layer'"):
        _run(fsdp_unit="layer")
