"""Bug: a collective without its backward dual.

A pass forgets Megatron's f (inserts a plain identity where grad_all_reduce
belongs), or creates communication with a raw c10d functional op that has no
fxpar dual. Both are caught statically. The forgotten f is invisible in the
forward; numerically only the input gradient shows it, and bisect walks the
backward to the node whose gradient first differs.
"""

from __future__ import annotations

import pytest
import torch

import fxpar
from zoo import MEGATRON, Stack, aten, compiled, fxpar_ops, mse, nodes, recompile


def _forget_f(pm) -> str:
    f = next(n for n in nodes(pm.graph_module, fxpar_ops.grad_all_reduce.default) if n.args[0].op == "placeholder")
    f.target, f.args = aten.clone.default, (f.args[0],)
    return f.name


def test_forgotten_f_is_caught_statically():
    world, pms, x, y = compiled(Stack(), plan=MEGATRON)
    name = _forget_f(pms[0])
    recompile(pms[0])
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    msg = str(e.value)
    assert f"consumes %{name} as Replicate on mesh dim 'tp' but its output is [S(1)]" in msg
    assert "only a partial sum" in msg and "missing dual in the backward" in msg
    assert "in module 'layers.0.up'" in msg and "insert_grad_all_reduce" in msg


def test_forgotten_f_shows_in_the_input_gradient_and_bisect_walks_the_backward_to_it():
    model = Stack()
    world, pms, x, y = compiled(model, plan=MEGATRON)
    for pm in pms:
        name = _forget_f(pm)
    recompile(*pms)
    reports = world.run(lambda r: fxpar.verify(model, pms[r], x, target=y, loss_fn=mse, bisect=True))
    report = reports[0]
    assert [t.name for t in report.failed] == ["grad input[0]"]  # forward and parameter grads agree
    found = report.bisect
    assert found.node == "x" and found.direction == "backward"
    assert f"%{name} (aten.clone.default)" in found.users
    assert "first diverging gradient: %x" in str(report)


def test_raw_functional_collective_without_dual_is_caught_statically():
    world, pms, x, _ = compiled(Stack(), plan=MEGATRON)
    gm = pms[0].graph_module
    ar = nodes(gm, fxpar_ops.all_reduce.default)[0]
    src, group = ar.args[0], ar.args[1]
    with gm.graph.inserting_before(ar):
        raw = gm.graph.call_function(torch.ops._c10d_functional.all_reduce.default, (src, "sum", group))
        waited = gm.graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (raw,))
    ar.target, ar.args = aten.alias.default, (waited,)  # forward values would even be right
    raw.meta.update(ar.meta)
    waited.meta.update(ar.meta)
    recompile(pms[0])
    with pytest.raises(fxpar.GraphInvariantError,
                       match=r"raw communication op _c10d_functional.all_reduce.default in the graph; its gradient "
                             r"has no fxpar dual"):
        fxpar.check(pms[0])
