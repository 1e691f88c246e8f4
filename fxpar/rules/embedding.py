"""Embedding lookups, including vocab-parallel embeddings.

    weight      indices     output
    S(0)        R           P       vocab parallel: each rank looks up the ids in its
                                    vocabulary range, zeros elsewhere; the sum over
                                    ranks is the full lookup
    S(1)        R           S(-1)   the embedding dim sharded
    R           S(k)        S(k)    batch / sequence sharded
    R           R           R

A vocab-parallel lookup is not `aten.embedding` on the local rows, so its
localize step swaps the node's target for `fxpar::vocab_parallel_embedding`,
whose backward scatters the gradient into this rank's rows only.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor

from fxpar._torch.aten import assert_async
from fxpar._torch.c10d import resolve_process_group
from fxpar.core.errors import ShardingError
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, register

aten = torch.ops.aten


def _range(weight: Tensor, group_name: str) -> tuple[int, int]:
    rank = resolve_process_group(group_name).rank()
    rows = weight.size(0)
    return rank * rows, rows


def _group_size(group_name: str) -> int:
    return resolve_process_group(group_name).size()


def _check_ids(indices: Tensor, vocab: int) -> None:
    """Ids outside [0, vocab) fail as `aten.embedding` fails on them, instead of masking to zeros.

    Every rank of the vocab group holds the same (replicated) ids, so all of them raise, and no
    communication is needed. On CPU that is embedding's IndexError; on an accelerator an
    asynchronous device assert, as embedding's kernel asserts (no host sync per lookup).
    """
    if indices.numel() == 0:
        return
    bad = (indices < 0) | (indices >= vocab)
    if indices.device.type == "cpu":
        if bool(bad.any()):
            first = indices[bad].flatten()[0].item()
            raise IndexError(f"index out of range in self (vocab-parallel embedding: id {first} is not in "
                             f"[0, {vocab}))")
    else:
        assert_async(~bad.any(), "vocab-parallel embedding: index out of range in self")


@torch.library.custom_op("fxpar::vocab_parallel_embedding", mutates_args=())
def vocab_parallel_embedding(weight: Tensor, indices: Tensor, padding_idx: int, group_name: str) -> Tensor:
    """This rank's part of an embedding whose rows (vocabulary) are sharded: a Partial value."""
    _check_ids(indices, weight.size(0) * _group_size(group_name))
    start, rows = _range(weight, group_name)
    shifted = indices - start
    mask = (shifted >= 0) & (shifted < rows)
    out = F.embedding(torch.where(mask, shifted, 0), weight)
    return out * mask.unsqueeze(-1).to(out.dtype)


@vocab_parallel_embedding.register_fake
def _(weight, indices, padding_idx, group_name):
    return weight.new_empty((*indices.shape, weight.size(1)))


def _vpe_setup(ctx, inputs, output):
    weight, indices, padding_idx, group_name = inputs
    ctx.save_for_backward(indices)
    ctx.rows, ctx.padding_idx, ctx.group_name = weight.size(0), padding_idx, group_name


def _vpe_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    rank = resolve_process_group(ctx.group_name).rank()
    start = rank * ctx.rows
    shifted = indices - start
    mask = (shifted >= 0) & (shifted < ctx.rows)
    local_pad = ctx.padding_idx - start if 0 <= ctx.padding_idx - start < ctx.rows else -1
    grad = grad * mask.unsqueeze(-1).to(grad.dtype)
    gw = aten.embedding_dense_backward(grad, torch.where(mask, shifted, 0), ctx.rows, local_pad, False)
    return gw, None, None, None


vocab_parallel_embedding.register_autograd(_vpe_backward, setup_context=_vpe_setup)


def _localize_embedding(node: fx.Node, info, mesh) -> None:
    weight_places = info.input_placements[0]
    dims = [m for m, p in enumerate(weight_places) if p.is_shard(0)]
    if not dims:
        return
    if len(dims) > 1:
        raise ShardingError(f"embedding %{node.name}: its weight is vocab-sharded on {len(dims)} mesh dims; "
                            "fxpar shards a vocabulary over one mesh dim: pin the embedding to 'replicate' on the "
                            "others")
    m = dims[0]
    group = mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"
    padding_idx = node.args[2] if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    node.target = torch.ops.fxpar.vocab_parallel_embedding.default
    node.args = (node.args[0], node.args[1], padding_idx, group)
    node.kwargs = {}


@register(aten.embedding.default, localize=_localize_embedding)
def embedding(op: OpInfo, cur) -> list[Strategy]:
    cw, ci = cur[0], cur[1]
    out_last = op.out_val.ndim - 1
    out: list[Strategy] = []
    if cw is not None and cw.is_shard(0):
        out.append(Strategy((S(0), R), P))
    if cw is not None and cw.is_shard(1):
        out.append(Strategy((S(1), R), S(out_last)))
    if ci is not None and ci.is_shard():
        out.append(Strategy((R, S(ci.dim)), S(ci.dim)))
    out.append(Strategy((R, R), R))
    return out


@register(torch.ops.fxpar.vocab_parallel_embedding.default)
def vocab_parallel(op: OpInfo, cur) -> list[Strategy]:
    """The localized form of a vocab-parallel lookup: vocab-sharded on its mesh dim, and on the
    others like any lookup (batch-sharded ids, or replicated)."""
    cw, ci = cur
    out = []
    if cw is not None and cw.is_shard(0):
        out.append(Strategy((S(0), R), P))
    if ci is not None and ci.is_shard():
        out.append(Strategy((R, S(ci.dim)), S(ci.dim)))
    out.append(Strategy((R, R), R))
    return out
