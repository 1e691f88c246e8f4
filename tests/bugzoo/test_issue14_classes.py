"""Bugs of the classes issue 14 fixed, planted as a faulty pass or a faulty launch would, and caught.

- A tied weight's gradient double-counted: a gradient all-reduce over dp planted on the tied lm_head's
  use on the gathered (replicated) batch, as before the fix (0.78 relative error): fxpar.check.
- A narrowing cast over a partial sum: the float32 cast moved before the all_reduce that completes the
  sum (each rank rounds its partial, then they add): fxpar.check.
- Ranks that disagree: one rank's copy of a replicated parameter differs (a rank initialized with its
  own seed and never broadcast): fxpar.verify names the parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.testing.simulate import SimWorld
from models import TiedLastToken
from zoo import MEGATRON, Stack, aten, compiled, copy_info, fxpar_ops, mse, node, nodes, recompile


def test_tied_weight_gradient_summed_again_over_dp_is_caught_statically():
    torch.manual_seed(0)
    model = TiedLastToken(no_rule=True).double()
    x = torch.randint(0, 32, (4, 6))
    world = SimWorld({"dp": 2})
    pms = world.parallelize(model, example_inputs=(x,))
    gm = pms[0].graph_module
    fxpar.check(pms[0])
    (proper,) = [n for n in nodes(gm, fxpar_ops.grad_all_reduce.default)
                 if n.args[0].op == "get_attr" and n.args[0].target == "lm_head.weight"]
    head = next(n for n in nodes(gm, aten.linear.default) if n.args[1].op == "get_attr"
                and n.args[1].target == "lm_head.weight")  # the tied weight on the gathered batch
    with gm.graph.inserting_before(head):
        planted = gm.graph.call_function(fxpar_ops.grad_all_reduce.default, (head.args[1], *proper.args[1:]))
    copy_info(planted, proper)
    head.args = (head.args[0], planted, *head.args[2:])
    recompile(pms[0])
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    assert "grad_all_reduce on mesh dim 'dp'" in str(e.value) and "gradient scaled by 2" in str(e.value), str(e.value)


class _DownThenCast(nn.Module):
    """Megatron MLP whose output is rounded to float32 (as RMSNorm's .to(float32) in a float64 Llama)."""

    def __init__(self, d: int = 8, h: int = 16) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, h), nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))).float().double() + x


def test_narrowing_cast_over_a_partial_sum_is_caught_statically():
    world, pms, x, _ = compiled(_DownThenCast(), plan={"up": "colwise", "down": "rowwise"})
    gm = pms[0].graph_module
    fxpar.check(pms[0])
    (reduce,) = nodes(gm, fxpar_ops.all_reduce.default)
    cast = next(iter(reduce.users))
    assert cast.meta["val"].dtype == torch.float32, cast
    # The planted bug: round each rank's partial sum, then add the rounded parts.
    partial = reduce.args[0]
    cast.replace_all_uses_with(reduce)
    cast.args = (partial, *cast.args[1:])
    reduce.args = (cast, *reduce.args[1:])
    reduce.prepend(cast)  # topological order: the cast now runs first
    recompile(pms[0])
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    assert cast.name in str(e.value) and "Partial" in str(e.value), str(e.value)


def test_a_rank_with_other_parameter_values_is_caught_by_verify():
    model = Stack()
    world, pms, x, y = compiled(model, plan=MEGATRON)
    with torch.no_grad():
        bias = next(p for n, p in pms[1].named_parameters() if n.endswith("down.bias"))
        bias.add_(1e-3)  # a replicated parameter, off on one rank only
    reports = world.run(lambda r: fxpar.verify(model.double(), pms[r], x, target=y, loss_fn=mse))
    assert not reports[0].ok and not reports[1].ok, str(reports[1])
    assert any("down.bias" in t.name for t in reports[1].failed), str(reports[1])


def _bn_pipeline_report() -> tuple:
    from models import BNStack

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
    torch.manual_seed(0)
    model = BNStack().double().train()
    x, y = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    # The planted bug: split_stages' refusal bypassed, so BatchNorm normalizes each microbatch by its own statistics.
    pm = fxpar.parallelize(model, mesh, example_inputs=(x,), plan=fxpar.Plan(pp=["blocks.1"]),
                           batch_norm_per_microbatch=True)
    report = fxpar.verify(model, pm, x, target=y, loss_fn=mse)
    return report.ok, [t.name for t in report.failed]


def test_batch_norm_statistics_per_microbatch_are_caught_by_verify():
    from fxpar.testing import rank_pool

    for ok, failed in rank_pool(2).run(_bn_pipeline_report):
        assert not ok and any("blocks.0.0.weight" in name for name in failed), failed
