"""Slicing, concatenation, splitting, gathering, scans, and ops that only make masks.

Along the dim an op slices, concatenates, scans or indexes, a shard would
change the op's meaning, so that dim must be whole; every other dim may keep
its sharding (rotary embeddings slice and concatenate the head dim while the
heads stay sharded). Index-based ops (index, gather) and mask construction run
replicated: their inputs are positions and ids, never large activations.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Shard
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpar._torch.fx import wrap_set_grad_enabled, wrap_with_autocast
from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.core.spec import size_key
from fxpar.rules.pointwise import cast_strategies
from fxpar.rules.loss import localize_gather, vocab_strategies
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, norm_dim, register

aten = torch.ops.aten


def _follow_except(op: OpInfo, cur, dim: int, *, linear: bool, n_out: int | None = None) -> list[Strategy]:
    """Shards on dims other than `dim` pass through; Partial passes if the op is linear."""
    out: list[Strategy] = []

    def wrap(p):
        return tuple(p for _ in range(n_out)) if n_out is not None else p

    c = cur[0]
    rest = len(cur) - 1
    if c is not None and c.is_shard() and c.dim != dim:
        out.append(Strategy((S(c.dim), *(R for _ in range(rest))), wrap(S(c.dim))))
    if linear and c is not None and c.is_partial():
        out.append(Strategy((P, *(R for _ in range(rest))), wrap(P)))
    out.append(Strategy(tuple(R for _ in cur), wrap(R)))
    return out


def _localize_split(node: fx.Node, info, mesh) -> None:
    # split(x, size, dim) on a dim sharded n ways (strided): each section is n times smaller.
    spec = info.spec[0]
    dim = norm_dim(node.args[2] if len(node.args) > 2 else 0, len(spec.shape))
    div = 1
    for p, n in zip(spec.placements, mesh.sizes):
        if p.is_shard(dim):
            div *= n
    if div > 1:
        size = node.args[1]
        size = [s // div for s in size] if isinstance(size, (list, tuple)) else size // div
        node.args = (node.args[0], size, *node.args[2:])


@register(aten.slice.Tensor, uneven=True)
def slice_(op: OpInfo, cur) -> list[Strategy]:
    dim = norm_dim(op.arg(1, "dim", 0), op.in_vals[0].ndim)
    # a full-range slice is a view of the whole dim: sharding may pass through it too
    full = op.in_vals[0].shape[dim] == op.out_val.shape[dim] and (op.arg(2, "start", 0) in (0, None))
    if full and cur[0] is not None and cur[0].is_shard(dim):
        return [Strategy((S(dim),), S(dim)), Strategy((R,), R)]
    return _follow_except(op, cur, dim, linear=True)


@register(aten.select.int, uneven=True)
def select(op: OpInfo, cur) -> list[Strategy]:
    dim = norm_dim(op.args[1], op.in_vals[0].ndim)
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim != dim:
        out.append(Strategy((S(c.dim),), S(c.dim - (1 if c.dim > dim else 0))))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out


@register(aten.cat.default, uneven=True)
def cat(op: OpInfo, cur) -> list[Strategy]:
    dim = norm_dim(op.arg(1, "dim", 0), op.out_val.ndim)
    out: list[Strategy] = []
    shard_dims = {c.dim for c in cur if c is not None and c.is_shard() and c.dim != dim}
    for d in sorted(shard_dims):
        out.append(Strategy(tuple(S(d) for _ in cur), S(d)))
    if all(c is not None and c.is_partial() for c in cur):
        out.append(Strategy(tuple(P for _ in cur), P))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out


@register(aten.split.Tensor, aten.split_with_sizes.default, localize=_localize_split)
def split(op: OpInfo, cur) -> list[Strategy]:
    x = op.in_vals[0]
    dim = norm_dim(op.arg(2, "dim", 0), x.ndim)
    n_out = len(op.out_val)
    out = _follow_except(op, cur, dim, linear=True, n_out=n_out)
    c = cur[0]
    # A fused projection's output, sharded section by section (strided), splits into sharded sections.
    if c is not None and _is_strided(c, dim, n_out) and _equal_sections(op, n_out):
        out.insert(0, Strategy((c,), tuple(S(dim) for _ in range(n_out))))
    return out


@register(aten.chunk.default)
def chunk(op: OpInfo, cur) -> list[Strategy]:
    """chunk(x, chunks, dim): split into equal sections; its argument is a count, nothing to localize.
    GPT-NeoX-style `qkv.chunk(3, dim=-1)` on a fused projection sharded section by section."""
    x = op.in_vals[0]
    dim = norm_dim(op.arg(2, "dim", 0), x.ndim)
    n_out = len(op.out_val)
    out = _follow_except(op, cur, dim, linear=True, n_out=n_out)
    c = cur[0]
    sizes = {size_key(v.shape[dim]) for v in op.out_val}
    if c is not None and _is_strided(c, dim, n_out) and len(sizes) == 1:
        out.insert(0, Strategy((c,), tuple(S(dim) for _ in range(n_out))))
    return out


@register(aten.unbind.int, uneven=True)
def unbind(op: OpInfo, cur) -> list[Strategy]:
    """unbind(x, dim): the outputs lose `dim`; other dims keep their shard (one index lower past dim)."""
    dim = norm_dim(op.arg(1, "dim", 0), op.in_vals[0].ndim)
    n_out = len(op.out_val)
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim != dim:
        out.append(Strategy((S(c.dim),), tuple(S(c.dim - (c.dim > dim)) for _ in range(n_out))))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), tuple(P for _ in range(n_out))))
    out.append(Strategy((R,), tuple(R for _ in range(n_out))))
    return out


def _is_strided(p, dim: int, sections: int) -> bool:

    return isinstance(p, _StridedShard) and p.dim == dim and p.split_factor == sections


def _equal_sections(op: OpInfo, n_out: int) -> bool:
    sizes = {size_key(v.shape[norm_dim(op.arg(2, 'dim', 0), v.ndim)]) for v in op.out_val}
    return len(sizes) == 1


@register(aten.cumsum.default, aten.cumprod.default)
def cumsum(op: OpInfo, cur) -> list[Strategy]:
    dim = norm_dim(op.args[1], op.in_vals[0].ndim)
    return _follow_except(op, cur, dim, linear=op.node.target == aten.cumsum.default)


@register(aten.diff.default)
def diff(op: OpInfo, cur) -> list[Strategy]:
    dim = norm_dim(op.arg(2, "dim", -1), op.in_vals[0].ndim)
    return _follow_except(op, cur, dim, linear=False)


def _index_out_dim(op: OpInfo, d: int) -> int | None:
    """Where dim d of x[indices] lands in the output, or None if an index tensor consumes it.

    Advanced indexing (aten.index.Tensor): the index tensors broadcast to b dims; if the
    indexed dims are adjacent, those b dims replace them in place, else they go first.
    """
    x = op.in_vals[0]
    indices = list(op.args[1])
    positions = [i for i, t in enumerate(indices) if t is not None]
    vals = [t.meta.get("val") if hasattr(t, "meta") else None for t in indices if t is not None]
    if d in positions or not positions or any(
            not isinstance(v, torch.Tensor) or v.dtype in (torch.bool, torch.uint8) for v in vals):
        return None  # masks consume several dims (and make data-dependent sizes): run replicated
    b = max(v.ndim for v in vals)
    if positions[-1] - positions[0] + 1 == len(positions):  # adjacent
        return d if d < positions[0] else d - len(positions) + b
    return b + sum(1 for i in range(d) if i not in positions)


@register(aten.index.Tensor)
def index(op: OpInfo, cur) -> list[Strategy]:
    """x[..., idx, ...]: a shard of a dim no index touches passes through (the batch of
    `h[:, [-1], :]`), the index tensors replicated; x[idx] is linear in x, so Partial passes too."""
    c = cur[0]
    rest = len(cur) - 1
    out: list[Strategy] = []
    if c is not None and c.is_shard():
        d = _index_out_dim(op, c.dim)
        if d is not None:
            out.append(Strategy((S(c.dim), *(R for _ in range(rest))), S(d)))
    if c is not None and c.is_partial():
        out.append(Strategy((P, *(R for _ in range(rest))), P))
    out.append(Strategy(tuple(R for _ in cur), R))
    return out


@register(aten.index_select.default)
def index_select(op: OpInfo, cur) -> list[Strategy]:
    """index_select(x, dim, idx): dims other than `dim` keep their shards (idx replicated)."""
    dim = norm_dim(op.args[1], op.in_vals[0].ndim)
    return _follow_except(op, cur, dim, linear=True)


def _same_size(a, b) -> bool:
    """Equal sizes, as expressions or as the shape environment knows (a loss's target rows)."""
    return size_key(a) == size_key(b) or statically_known_true(a == b)


@register(aten.gather.default, localize=localize_gather)
def gather(op: OpInfo, cur) -> list[Strategy]:
    """gather(x, dim, idx): out[.., i, ..] = x[.., idx[.., i, ..], ..] along `dim`, position for
    position on every other dim; so x and idx sharded alike on another dim of equal size give
    that shard of the output (a per-row pick such as log_probs.gather(-1, target) on a batch shard).
    With x sharded along `dim` itself (vocab-sharded logits) and idx replicated, each rank picks the
    indices in its range: a Partial sum (`fxpar.rules.loss`)."""
    x, idx = op.in_vals[0], op.in_vals[1]
    dim = norm_dim(op.args[1], x.ndim)
    out: list[Strategy] = vocab_strategies(op, cur, dim)
    for c in (cur[0], cur[1]):
        if c is not None and c.is_shard() and c.dim != dim and c.dim < idx.ndim \
                and _same_size(x.shape[c.dim], idx.shape[c.dim]):
            out.append(Strategy((S(c.dim), S(c.dim)), S(c.dim)))
            break
    if cur[0] is not None and cur[0].is_partial():
        out.append(Strategy((P, R), P))
    out.append(Strategy((R, R), R))
    return out


@register(aten.masked_select.default,
          aten.nonzero.default, aten.argmax.default, aten.argmin.default, aten.sort.default,
          aten.tril.default, aten.triu.default, aten.bitwise_and.Scalar, aten.__and__.Tensor,
          aten.__or__.Tensor, aten.repeat.default, aten.flip.default, aten.roll.default)
def replicated_only(op: OpInfo, cur) -> list[Strategy]:
    """Ops fxpar always runs replicated (ids, positions and masks; cheap)."""
    n_out = len(op.out_val) if isinstance(op.out_val, (tuple, list)) else None
    out = tuple(R for _ in range(n_out)) if n_out is not None else R
    return [Strategy(tuple(R for _ in cur), out)]


@register(aten.topk.default)
def topk(op: OpInfo, cur) -> list[Strategy]:
    """topk along one dim (a router's top-k experts per token): rows cut along another dim stay cut."""
    dim = op.arg(2, "dim", -1) % op.in_vals[0].ndim
    c = cur[0]
    out = []
    if c is not None and c.is_shard() and type(c) is Shard and c.dim != dim:
        out.append(Strategy((c,), (c, c)))
    out.append(Strategy((R,), (R, R)))
    return out


@register(aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default, aten.ones.default,
          aten.full.default, aten.empty.memory_format, aten.scalar_tensor.default, aten.eye.default)
def factory(op: OpInfo, cur) -> list[Strategy]:
    """Constants: computed the same on every rank."""
    return [Strategy(tuple(R for _ in cur), R)]


@register(aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default)
def new_factory(op: OpInfo, cur) -> list[Strategy]:
    """x.new_*(size): x lends only dtype and device, so it may stay as it is."""
    return [Strategy(tuple(cur), R)]


@register(aten.zeros_like.default, aten.ones_like.default, aten.full_like.default, aten.empty_like.default)
def like_factory(op: OpInfo, cur) -> list[Strategy]:
    """*_like(x): x lends its (local) shape; a shard of x gives a shard of the result."""
    c = cur[0]
    if c is not None and c.is_shard():
        return [Strategy((c,), S(c.dim))]
    return [Strategy((c,), R)] if c is not None else [Strategy((R,), R)]


@register(aten.to.dtype_layout, aten.to.device, aten.to.prim_dtype)
def convert(op: OpInfo, cur) -> list[Strategy]:
    """dtype / device conversions: elementwise; linear only where the dtype stays (see `cast_strategies`)."""
    return cast_strategies(op, cur)


def _register_hops() -> None:
    # Higher-order ops whose bodies compute position tables (rotary cos/sin) from replicated inputs.

    register(wrap_set_grad_enabled, wrap_with_autocast)(replicated_only)


_register_hops()
