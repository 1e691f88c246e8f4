"""insert_collectives: a value cut over several data dims is gathered back last-cut first."""

from __future__ import annotations

import torch

from fxpar.ops.transitions import collective_args
from pass_harness import Fn, calls, run_upto


def test_batch_cut_over_dp_then_ep_is_gathered_over_ep_then_dp():
    # flip along the batch runs replicated: the batch-sharded input is gathered first
    gm = run_upto("insert_collectives", Fn(lambda x: torch.flip(x * 2, [0])), (torch.randn(8, 4),),
                  {"dp": 2, "ep": 2}, dynamic=False)
    gathers = calls(gm, torch.ops.fxpar.all_gather.default)
    assert [collective_args(g)["mesh_dim"] for g in gathers] == ["ep", "dp"]
    assert gathers[1].args[0] is gathers[0]
