"""The fused MoE node's cost (`fxpar.analysis.cost.node_cost`): expert FLOPs, routed rows, ep exchange.

Stage balancing charged a `moe_experts` node one FLOP per output element: a pipeline of a MoE layer
and dense layers put most of the dense layers with the experts. It now costs each local token's
top-k slots through one expert's three matmuls, 2 T k 3 H I.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.analysis.cost import evaluate, example_sizes, node_cost
from fxpar.ops.moe import moe_all_to_all_bytes, moe_experts

from tests.models import TitanMoE, TitanMoEStack

DIM, HIDDEN, EXPERTS, TOP_K = 16, 32, 4, 2


def _moe_nodes(report):
    graphs = [m for m in report.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]  # pipeline stages too
    return [n for g in graphs for n in g.graph.nodes if n.target is moe_experts]


@pytest.mark.parametrize("mesh,inter,ep", [({"dp": 2}, HIDDEN, 1), ({"tp": 2}, HIDDEN // 2, 1), ({"ep": 2}, HIDDEN, 2)])
def test_moe_node_cost(mesh, inter, ep):
    x = torch.randn(4, 4, DIM, dtype=torch.float64)
    report = fxpar.plan(TitanMoEStack(DIM, HIDDEN, 2, EXPERTS, TOP_K).double(), mesh, example_inputs=(x,))
    nodes = _moe_nodes(report)
    assert len(nodes) == 2
    hints = example_sizes(report.graph_module)
    tokens = 16 // 2 if "tp" not in mesh else 16  # the batch is split on dp and ep, whole on tp
    for node in nodes:
        cost = node_cost(node)
        assert evaluate(cost.flops, hints) == 2 * tokens * TOP_K * 3 * DIM * inter
        rows = tokens * TOP_K * (2 * DIM + 3 * inter) * 8
        weights = 3 * (EXPERTS // ep) * DIM * inter * 8
        assert evaluate(cost.mem_bytes, hints) >= rows + weights
        assert evaluate(cost.comm_bytes, hints) == pytest.approx(
            moe_all_to_all_bytes(tokens, TOP_K, DIM, 8, ep) if ep > 1 else 0.0)


class _MoEThenDense(nn.Module):
    """One wide MoE layer, then eight dense layers: the experts cost about as much as the dense layers."""

    def __init__(self, dim: int = 256, hidden: int = 512, dense: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.moe = TitanMoE(dim, hidden, num_experts=4, top_k=2)
        self.dense = nn.ModuleList(nn.Linear(dim, dim) for _ in range(dense))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        x = x + self.moe(x)
        for layer in self.dense:
            x = torch.relu(layer(x))
        return x


def test_pipeline_split_balances_by_expert_flops():
    """2 T k 3 H I = 1.6 GFLOP for the experts against 8 x 0.13 GFLOP of dense layers: the experts get a
    stage of their own. Charged one FLOP per output element (and its weights' bytes), the cut was before
    dense.2: inp, the experts and two dense layers in the first stage."""
    torch.manual_seed(0)
    x = torch.randn(4, 256, 256)
    report = fxpar.plan(_MoEThenDense(), {"pp": 2}, example_inputs=(x,))
    assert report.plan.pp == ("dense.0",)
    (node,) = _moe_nodes(report)
    assert evaluate(node_cost(node).flops, example_sizes(node.graph.owning_module)) == 2 * 1024 * 2 * 3 * 256 * 512
