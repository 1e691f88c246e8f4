"""Bug: one rank issues two same-shape all_reduces in the other order.

gloo and NCCL do not notice (same op, shape and dtype): the ranks silently sum
one branch's partial results with the other's. Caught statically across ranks
(check with every rank's module), and at run time by the collective-order
fingerprint exchanged on the first forward, which fails on every rank at once
naming the first differing collective, instead of computing garbage.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.testing import rank_pool
from zoo import TwoBranches, compiled, fxpar_ops, nodes

PLAN = {"a.up": "colwise", "a.down": "rowwise", "b.up": "colwise", "b.down": "rowwise"}


def swap_branch_all_reduces(gm) -> tuple[str, str]:
    """Moves branch a's all_reduce (and what depends on it) after branch b's: a valid, reordered graph."""
    first, second = nodes(gm, fxpar_ops.all_reduce.default)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    tail, seen = [], {first}
    for n in gm.graph.nodes:
        if order[n] >= order[second]:
            break
        if n in seen or any(a in seen for a in n.all_input_nodes):
            seen.add(n)
            tail.append(n)
    anchor = second
    for n in tail:
        anchor.append(n)
        anchor = n
    gm.graph.lint()
    gm.recompile()
    return first.name, second.name


def test_swapped_collectives_on_one_rank_are_caught_statically_across_ranks():
    world, pms, x, _ = compiled(TwoBranches(), plan=PLAN)
    a, b = swap_branch_all_reduces(pms[1].graph_module)
    fxpar.check(pms[1])  # each rank's graph alone is fine
    with pytest.raises(fxpar.GraphInvariantError) as e:
        fxpar.check(pms[0], ranks=pms)
    msg = str(e.value)
    assert "issue different collectives: first difference at collective #0" in msg
    # Shapes print as captured: the batch dim is symbolic.
    assert re.search(rf"rank 0: forward all_reduce\(tp\) \[s\d+, 8\] float64 at %{a} in 'a.down'", msg), msg
    assert re.search(rf"rank 1: forward all_reduce\(tp\) \[s\d+, 8\] float64 at %{b} in 'b.down'", msg), msg


def test_fingerprint_fails_at_the_first_forward_on_every_rank_naming_the_collective():
    world, pms, x, _ = compiled(TwoBranches(), plan=PLAN)
    a, b = swap_branch_all_reduces(pms[1].graph_module)
    with pytest.raises(fxpar.GraphInvariantError) as e:
        world.run(lambda r: pms[r](x))
    msg = str(e.value)
    assert "collective order differs across the ranks of mesh dim 'tp'" in msg
    assert re.search(rf"group rank 0 at coordinate \[0\]: forward all_reduce\(tp\) \[s\d+, 8\] float64 at %{a} "
                     r"in 'a.down'", msg), msg
    assert re.search(rf"group rank 1 at coordinate \[1\]: forward all_reduce\(tp\) \[s\d+, 8\] float64 at %{b} "
                     r"in 'b.down'", msg), msg
    assert "rank 1: GraphInvariantError" in "\n".join(getattr(e.value, "__notes__", []))  # both ranks failed


def test_without_the_fingerprint_the_swap_is_silently_wrong():
    model = TwoBranches()
    world, pms, x, _ = compiled(model, plan=PLAN)
    swap_branch_all_reduces(pms[1].graph_module)
    for pm in pms:
        pm._fingerprint_checked = True  # what a runtime without the exchange would do
    outs = world.run(lambda r: pms[r](x).detach())
    want = model(x)
    assert all(torch.isfinite(o).all() for o in outs)  # no error, no hang ...
    assert (outs[0] - want).abs().max() > 1e-3  # ... and wrong


def _gloo_swapped(x: torch.Tensor) -> str:
    from zoo import TwoBranches as Model

    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    pm = fxpar.parallelize(Model().double(), mesh, example_inputs=(x,), plan=PLAN)
    if dist.get_rank() == 1:
        swap_branch_all_reduces(pm.graph_module)
    try:
        pm(x)
    except fxpar.GraphInvariantError as e:
        return str(e)
    return "no error"


def test_fingerprint_on_real_gloo_ranks_fails_fast_instead_of_computing_garbage():
    x = torch.randn(4, 8, dtype=torch.float64)
    out = rank_pool(2).run(_gloo_swapped, x, timeout=30)
    for msg in out:
        assert "collective order differs across the ranks of mesh dim 'tp'" in msg
        assert "%allreduce_linear_1_nobias in 'a.down'" in msg and "in 'b.down'" in msg
