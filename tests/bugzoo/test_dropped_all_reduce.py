"""Bug: a pass drops the all_reduce after a row-parallel linear (the Partial sums are used as if whole).

Caught statically: a Partial value reaches an op that is not linear in it.
"""

from __future__ import annotations

import dataclasses

import pytest

import fxpar
from fxpar.core.spec import get_info, set_info
from torch.distributed.tensor.placement_types import Partial
from zoo import MEGATRON, Stack, compiled, fxpar_ops, nodes, recompile


def _drop_first_all_reduce(pm) -> str:
    gm = pm.graph_module
    ar = nodes(gm, fxpar_ops.all_reduce.default)[0]
    src = ar.args[0]
    ar.replace_all_uses_with(src)
    gm.graph.erase_node(ar)
    return src.name


def test_dropped_all_reduce_is_caught_statically_naming_node_module_and_fix():
    model = Stack()
    world, pms, x, _ = compiled(model, plan=MEGATRON)
    for pm in pms:
        partial = _drop_first_all_reduce(pm)
    recompile(*pms)
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0])
    msg = str(e.value)
    assert f"input %{partial} is [P]" in msg and "needs [R]" in msg
    assert "a Partial value reaches add.Tensor, which is not linear in it" in msg
    assert "a dropped all_reduce" in msg and "'tp'" in msg
    assert "in module 'layers.0.down'" in msg
    # Numerically the outputs are off too (each rank adds only its partial sum).
    reports = world.run(lambda r: fxpar.verify(model.double(), pms[r], x))
    assert not reports[0].ok and reports[0].worst[0].name == "output[0]"


def test_dropped_all_reduce_with_doctored_metadata_is_still_caught_by_the_rule_check():
    """The faulty pass also rewrites the consumer's recorded placements to accept the Partial input."""
    world, pms, x, _ = compiled(Stack(), plan=MEGATRON)
    pm = pms[0]
    partial = _drop_first_all_reduce(pm)
    gm = pm.graph_module
    bias_add = next(iter(next(n for n in gm.graph.nodes if n.name == partial).users))
    info = get_info(bias_add)
    set_info(bias_add, dataclasses.replace(info, input_placements=((Partial(),), *info.input_placements[1:])))
    recompile(pm)
    with pytest.raises(fxpar.GraphInvariantError,
                       match=rf"a Partial value \(%{partial}\) reaches an op that is not linear in it on mesh dim "
                             r"'tp'.*Reduce the Partial input first"):
        fxpar.check(pm)
