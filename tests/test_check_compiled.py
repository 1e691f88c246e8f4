"""Under compile=True, the collective order inductor compiled is the same on every rank (fxpar.verify.compiled_order)."""

from __future__ import annotations

import pytest
import torch

import fxpar
from fxpar._torch.inductor import SWAP_OP
from fxpar.verify.compiled_order import compare_orders

from tests.models import MLPStack, mse

MEGATRON = {"layers.*.up": "colwise", "layers.*.down": "rowwise"}
AR = "_c10d_functional.all_reduce_.default"


def _entries(*ops):
    return [(0, op, (("8", "16"),), ("sum", "g")) for op in ops]


def test_equal_orders_pass():
    compare_orders([_entries(AR, AR), _entries(AR, AR)], group="g", dim="tp", ranks=[0, 1])


def test_a_rank_that_compiled_another_order_is_caught():
    other = _entries(AR)
    other.insert(0, (0, "_c10d_functional.all_gather_into_tensor.default", (("8", "16"),), ("2", "g")))
    with pytest.raises(fxpar.GraphInvariantError) as e:
        compare_orders([_entries(AR, "_c10d_functional.all_gather_into_tensor.default"), other], group="g",
                       dim="tp", ranks=[0, 1])
    msg = str(e.value)
    assert "group 'g' (mesh dim 'tp', ranks [0, 1]): first difference at compiled collective #0" in msg
    assert f"rank 0: compiled graph 0: {AR}" in msg and "rank 1: compiled graph 0: _c10d_functional.all_gather" in msg
    assert "compile with the same options on every rank" in msg


def test_a_rank_with_fewer_compiled_collectives_is_caught():
    with pytest.raises(fxpar.GraphInvariantError, match=r"#1:\n  rank 0: compiled graph 0.*\n  rank 1: \(none"):
        compare_orders([_entries(AR, AR), _entries(AR)], group="g", dim="tp", ranks=[0, 1])


def _compiled_orders():
    from fxpar.verify.compiled_order import check_compiled_order

    torch.manual_seed(0)
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    pm = fxpar.parallelize(MLPStack(16, 32, 2).double(), mesh, example_inputs=(x,), plan=MEGATRON, compile=True)
    orders = check_compiled_order(pm, x, target=y, loss_fn=mse)
    loss = pm.step(x, target=y, loss_fn=mse)  # the module still runs, with the options it had
    return dict(orders=orders, passes=pm.compile_options["reorder_for_compute_comm_overlap_passes"],
                loss=float(loss))


@pytest.mark.slow  # inductor's C++ compile of a forward and a backward on 2 ranks: about a minute
def test_compiled_tp_order_is_the_same_on_both_ranks():
    from fxpar.testing import rank_pool

    results = rank_pool(2).run(_compiled_orders)
    for r in results:
        forward, backward = r["orders"][0], r["orders"][-1]
        assert len(r["orders"]) == 2  # the forward graph and the backward graph, each recorded once
        # on gloo with 2 ranks each all-reduce is an all-to-all swapping the ranks' buffers (fxpar.ops.exchange),
        # named the same on both ranks: ('swap', rows)
        assert [e[0] for e in forward].count(SWAP_OP) == 2  # one all-reduce per Megatron block (rowwise down)
        assert all(e[2][:2] == ("swap", "8") for e in forward if e[0] == SWAP_OP), forward
        # the f dual of block 1's colwise input (block 0's input, x, needs no gradient)
        assert [e[0] for e in backward] == [SWAP_OP] and backward[0][1] == (("8", "16"),)
        assert not any("Recorder" in type(p).__name__ for p in r["passes"])  # options restored
    assert results[0]["orders"] == results[1]["orders"]
