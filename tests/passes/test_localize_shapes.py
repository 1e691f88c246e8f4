"""localize_shapes: global sizes baked into shape arguments become this rank's local sizes."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.analysis.invariants import local_fake_run
from fxpar.core.spec import get_spec
from pass_harness import calls, context, run_upto

aten = torch.ops.aten
PLAN = {"up": "colwise", "down": "rowwise"}
MESH = {"dp": 2, "tp": 2}


class Heads(nn.Module):
    """A column-parallel projection viewed as 4 heads of 8, then flattened back for the row-parallel one."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.down = nn.Linear(32, 16)

    def forward(self, x):
        b = x.shape[0]
        h = self.up(x).view(b, 4, 8)                     # (B/dp, 4/tp, 8)
        return self.down(torch.relu(h).reshape(b, -1))  # (B/dp, 32/tp)


def _shape_ops(gm):
    return calls(gm, aten.view.default) + calls(gm, aten.reshape.default)


def test_static_shape_arguments_become_the_local_shape():
    gm = run_upto("localize_shapes", Heads(), (torch.randn(4, 16),), MESH, PLAN, dynamic=False)
    view, reshape = _shape_ops(gm)
    assert view.args[1] == [2, 2, 8] and get_spec(view).local_shape == (2, 2, 8)
    assert reshape.args[1] == [2, -1]  # -1 stays -1
    assert get_spec(reshape).local_shape == (2, 16)
    assert get_spec(view).shape == (4, 4, 8)  # the spec and meta["val"] stay global
    assert tuple(view.meta["val"].shape) == (4, 4, 8)


def test_without_it_the_graph_does_not_run_on_local_shapes():
    # the check run_upto's pass manager passes after localize_shapes fails one pass earlier
    gm = run_upto("insert_collectives", Heads(), (torch.randn(4, 16),), MESH, PLAN, dynamic=False)
    with pytest.raises(fxpar.GraphInvariantError, match="view"):
        local_fake_run(gm)
    result = fxpar.passes.localize_shapes(gm, context(MESH, PLAN))
    assert result.modified
    assert local_fake_run(gm)


def test_a_size_read_of_a_sharded_dim_is_scaled_back_to_the_global_size():
    gm = run_upto("localize_shapes", Heads(), (torch.randn(4, 16),), MESH, PLAN)  # symbolic batch
    (size,) = calls(gm, aten.sym_size.int)
    assert get_spec(size.args[0]).placements[0].is_shard(0) and size.args[1] == 0
    (scaled,) = size.users  # every reader sees rows x dp, the global batch ...
    assert scaled.target == operator.mul and scaled.args == (size, 2)
    # ... and each shape argument divides it back down where it is used
    for op in _shape_ops(gm):
        (b,) = [a for a in op.args[1] if isinstance(a, torch.fx.Node)]
        assert b.target == operator.floordiv and b.args == (scaled, 2)


def test_nothing_sharded_nothing_rewritten():
    gm = run_upto("insert_collectives", Heads(), (torch.randn(4, 16),), {"tp": 2},
                  {"up": "replicate", "down": "replicate"}, dynamic=False)
    result = fxpar.passes.localize_shapes(gm, context({"tp": 2}))
    assert not result.modified
    assert [op.args[1] for op in _shape_ops(gm)] == [[4, 4, 8], [4, -1]]
