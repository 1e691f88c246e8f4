"""gloo collectives on 2 ranks as one all-to-all swap (fxpar.ops.exchange): the same bits as gloo's own.

The reduce-scatter on more ranks is an all-to-all of every block and a sum in rank order (close to gloo's)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fxpar.ops import exchange, overlap, waiting
from fxpar.testing import rank_pool


def _swaps(spin: str):
    os.environ[waiting.SPIN_ENV] = spin
    try:
        from torch.distributed.device_mesh import init_device_mesh

        n = dist.get_world_size()
        name = init_device_mesh("cpu", (n,), mesh_dim_names=("tp",)).get_group("tp").group_name
        c10d = waiting._c10d
        r = dist.get_rank()
        gen = torch.Generator().manual_seed(20 + r)
        out = {"pair_rank": waiting.gather_rank_in_place(name, torch.empty(0))}
        for dtype in (torch.float64, torch.bfloat16):
            x = torch.randn(6, 5, generator=gen).to(dtype)
            theirs_sum = c10d.wait_tensor(c10d.all_reduce(x, "sum", name))
            theirs_gather = c10d.wait_tensor(c10d.all_gather_into_tensor(x, n, name))
            mine_sum = waiting.all_reduce(x, "sum", name)
            out[f"sum {dtype}"] = torch.equal(mine_sum, theirs_sum)
            out[f"sum bits {dtype}"] = mine_sum
            out[f"gather {dtype}"] = torch.equal(waiting.all_gather(x, n, name), theirs_gather)
            # issued, then waited after other work; into a caller's buffer
            buf = torch.empty(n * 6, 5, dtype=dtype)
            pending = waiting.start_all_gather(x, n, name, out=buf)
            x_before = x.clone()
            out[f"issued {dtype}"] = waiting.wait(pending) is buf and torch.equal(buf, theirs_gather)
            out[f"input kept {dtype}"] = torch.equal(x, x_before)
            rows = torch.randn(2 * n, 3, generator=gen).to(dtype)
            theirs_rs = c10d.wait_tensor(c10d.reduce_scatter_tensor(rows, "sum", n, name))
            mine_rs = waiting.reduce_scatter(rows, n, name)  # summed in rank order: the same bits on 2 ranks
            # beyond 2 ranks the order of the adds may differ from gloo's: each of the n - 1 adds rounds once
            # (float64: 2^-52, bf16: 2^-8 of a partial sum, at most n * max|x|)
            bound = (n - 1) * n * rows.abs().max().double() * (2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -52)
            out[f"reduce-scatter {dtype}"] = (torch.equal(mine_rs, theirs_rs) if n == 2 else
                                              bool(((mine_rs.double() - theirs_rs.double()).abs() <= bound).all()))
        # FSDP's flat gather: the pieces cast and concatenated straight into this rank's block
        pieces = [torch.randn(3, 4, generator=gen), torch.randn(7, generator=gen)]
        flat = torch.cat([p.reshape(-1) for p in pieces]).to(torch.bfloat16)
        theirs = c10d.wait_tensor(c10d.all_gather_into_tensor(flat, n, name))
        out["flat"] = torch.equal(overlap.wait(overlap.start_flat_all_gather(pieces, n, name, torch.bfloat16)),
                                  theirs)
        empty = torch.empty(0, 3)
        out["empty"] = (waiting.all_gather(empty, n, name).shape == (0, 3)
                        and waiting.all_reduce(empty, "sum", name).shape == (0, 3))
        out["left"] = len(waiting._issued)
        return out
    finally:
        os.environ.pop(waiting.SPIN_ENV, None)


def test_swaps_equal_gloos_own_collectives_bit_for_bit():
    for spin in ("0", "10"):  # blocking and polled waits
        outs = rank_pool(2).run(_swaps, spin)
        assert [o["pair_rank"] for o in outs] == [0, 1]
        for o in outs:
            bad = [k for k, v in o.items() if v is False]
            assert not bad, (spin, bad)
            assert o["left"] == 0
        for dtype in (torch.float64, torch.bfloat16):  # every rank holds the same sum
            assert torch.equal(outs[0][f"sum bits {dtype}"], outs[1][f"sum bits {dtype}"])


def test_more_than_two_ranks_keep_gloos_collectives():
    outs = rank_pool(4).run(_swaps, "0")
    assert [o["pair_rank"] for o in outs] == [None] * 4
    for o in outs:
        assert not [k for k, v in o.items() if v is False]


def test_swap_splits_send_everything_to_the_other_rank():
    assert exchange.swap_splits(0, 12) == [0, 12]
    assert exchange.swap_splits(1, 12) == [12, 0]
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])
    out = torch.empty(2)
    assert exchange.sum_blocks([a, b], out) is out and torch.equal(out, a + b)
    blocks = torch.stack([a, b, b])  # more ranks: the [n, block] blocks received, summed over dim 0
    assert torch.equal(exchange.sum_blocks(blocks, torch.empty(2)), blocks.sum(0))
