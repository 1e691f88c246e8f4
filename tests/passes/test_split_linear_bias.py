"""split_linear_bias: a row-parallel projection's bias becomes its own add, after the reduction."""

from __future__ import annotations

import torch
import torch.nn as nn

import fxpar
from fxpar.core.spec import get_info
from models import MLPBlock
from pass_harness import calls, context, param, run_upto

aten = torch.ops.aten
MEGATRON = {"up": "colwise", "down": "rowwise"}


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D: addmm(bias, x, weight[in, out])."""

    def __init__(self, nx: int, nf: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


class ConvMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = Conv1D(16, 32)
        self.down = Conv1D(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _split(model, plan, mesh=None):
    """(graph after annotate_parameters, PassResult of split_linear_bias on it)."""
    x = torch.randn(4, 16)
    gm = run_upto("annotate_parameters", model, (x,), mesh or {"tp": 2}, plan, dynamic=False)
    result = fxpar.passes.split_linear_bias(gm, context(mesh or {"tp": 2}, plan))
    gm.graph.lint()
    return result.graph_module, result.modified


def test_row_parallel_linear_bias_moves_to_an_add_after_the_bias_free_linear():
    gm, modified = _split(MLPBlock(16, 32, residual=False), MEGATRON)
    assert modified
    up, down = calls(gm, aten.linear.default)
    (add,) = calls(gm, aten.add.Tensor)
    # the column-parallel linear keeps its (sharded) bias
    assert up.args[1:] == (param(gm, "up.weight"), param(gm, "up.bias"))
    assert down.name == "linear_1_nobias" and down.args[1:] == (param(gm, "down.weight"),)
    assert add.name == "linear_1" and add.args == (down, param(gm, "down.bias"))
    assert list(down.users) == [add]
    # the new node keeps the original's value and provenance, but no fxpar info of its own
    assert tuple(down.meta["val"].shape) == (4, 16) and "nn_module_stack" in down.meta
    assert get_info(down) is None


def test_conv1d_addmm_becomes_mm_then_add_when_its_weight_is_sharded_on_the_reduced_dim():
    gm, modified = _split(ConvMLP(), MEGATRON)
    assert modified
    (addmm,) = calls(gm, aten.addmm.default)      # the column-parallel one is left alone
    (mm,) = calls(gm, aten.mm.default)
    (add,) = calls(gm, aten.add.Tensor)
    assert addmm.args[0] is param(gm, "up.bias")
    assert mm.args[1] is param(gm, "down.weight") and add.args == (mm, param(gm, "down.bias"))


def test_nothing_to_split_without_row_parallel_bias():
    for model, plan in [(MLPBlock(16, 32, residual=False, bias=False), MEGATRON),   # no bias
                        (MLPBlock(16, 32, residual=False), {"up": "replicate", "down": "replicate"}),
                        (MLPBlock(16, 32, residual=False), {"up": "colwise"})]:
        gm, modified = _split(model, plan)
        assert not modified and calls(gm, aten.add.Tensor) == []


def test_the_split_graph_computes_the_same():
    model = MLPBlock(16, 32)
    x = torch.randn(4, 16)
    gm = run_upto("split_linear_bias", model, (x,), {"tp": 2}, MEGATRON, dynamic=False)
    assert len(calls(gm, aten.add.Tensor)) == 2  # the residual and the moved bias
    torch.testing.assert_close(gm(x), model(x))


def test_the_reduction_lands_between_the_matmul_and_the_bias():
    # what the split is for: the bias is added once, after the all-reduce, not tp times
    for model, matmul in [(MLPBlock(16, 32, residual=False), aten.linear.default), (ConvMLP(), aten.mm.default)]:
        gm = run_upto("insert_collectives", model, (torch.randn(4, 16),), {"tp": 2}, MEGATRON, dynamic=False)
        (ar,) = calls(gm, torch.ops.fxpar.all_reduce.default)
        assert ar.args[0].target == matmul and ar.args[0].args[1] is param(gm, "down.weight")
        (add,) = ar.users
        assert add.target == aten.add.Tensor and add.args[1] is param(gm, "down.bias")
