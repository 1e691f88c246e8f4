"""Bug: a gradient scaled by a constant.

Two ways a pass scales a gradient. It can hand a replicated use the value
behind a reducing dual (grad_all_reduce), so the backward sums full gradients
over the tp ranks: caught statically. Or it can leave every forward value and
placement intact and still scale the backward (here: x.detach() + (x - x.detach())
* 0.5, an identity forward with half the gradient): no static check can see
that, verify does: the parameter gradients upstream are exactly half, and
bisect names the node whose gradient first differs.
"""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar.core.spec import get_info
from zoo import MEGATRON, Stack, aten, compiled, copy_info, fxpar_ops, mse, node, nodes, recompile


def test_reducing_dual_on_a_replicated_use_is_caught_statically():
    world, pms, x, _ = compiled(Stack(), plan=MEGATRON)
    gm = pms[0].graph_module
    f = next(n for n in nodes(gm, fxpar_ops.grad_all_reduce.default) if n.args[0].op == "placeholder")
    residual = node(gm, "add")  # layers.0: down(...) + x
    residual.args = (residual.args[0], f)
    recompile(pms[0])
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    msg = str(e.value)
    assert f"grad_all_reduce on mesh dim 'tp' feeds %add, whose output is Replicate on 'tp'" in msg
    assert "a gradient scaled by 2" in msg


def _halve_gradient_of(pm, name: str) -> None:
    """Replaces v by v.detach() + (v - v.detach()) * 0.5 for all its users: same value, half the gradient."""
    gm = pm.graph_module
    v = node(gm, name)
    users = list(v.users)
    placements = get_info(v).spec.placements
    prev = v
    made = []
    for target, args in ((aten.detach.default, lambda: (v,)), (aten.sub.Tensor, lambda: (v, made[0])),
                         (aten.mul.Tensor, lambda: (made[1], 0.5)), (aten.add.Tensor, lambda: (made[0], made[2]))):
        with gm.graph.inserting_after(prev):
            n = gm.graph.call_function(target, args())
        n_tensors = sum(isinstance(a, torch.fx.Node) for a in n.args)
        copy_info(n, v, input_placements=tuple(placements for _ in range(n_tensors)), role="compute",
                  origin="planted")
        made.append(n)
        prev = n
    for u in users:
        u.replace_input_with(v, made[-1])
    recompile(pm)


def test_scaled_backward_is_invisible_statically_and_caught_numerically_with_the_node_named():
    model = Stack()
    world, pms, x, y = compiled(model, plan=MEGATRON)
    for pm in pms:
        _halve_gradient_of(pm, "add")  # the output of layers.0
    fxpar.check(pms[0], ranks=pms)  # a valid graph: identity forward, every placement consistent
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse, bisect=True))
    report = reports[0]
    bad = {t.name for t in report.failed}
    assert bad == {"grad layers.0.up.weight", "grad layers.0.up.bias", "grad layers.0.down.weight",
                   "grad layers.0.down.bias", "grad input[0]"}
    assert "(parallel = 0.5 x original throughout)" in report["grad layers.0.up.weight"].detail
    found = report.bisect
    assert found.node == "add" and found.direction == "backward"
    assert "the gradient comes from the backward of" in str(report)
