"""View-like ops: view / reshape, transpose / permute, unsqueeze / squeeze, expand.

A view keeps a sharded input dim d sharded when the output has a dim e that
starts at the same flat offset (prod(in[:d]) == prod(out[:e])) and either
merges d with the dims after it (d is the outermost of the merged group) or
splits d with out[e] divisible by the mesh size; the local chunk is then the
same contiguous block of memory on both sides. Anything else must gather first.

Exported graphs hold global sizes in shape arguments (`view(x, [2, 8, 4, 16])`);
`localize_shape_arg` rewrites the sharded entries to local sizes.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.core.spec import TensorSpec, chunk_bounds, divides, shape_key
from fxpar.rules.registry import OpInfo, P, R, S, Strategy, norm_dim, register

aten = torch.ops.aten


def _eq(a: Any, b: Any) -> bool:
    return bool(statically_known_true(a == b)) if isinstance(a, torch.SymInt) or isinstance(b, torch.SymInt) else a == b


def _prod(xs) -> Any:
    out = 1
    for x in xs:
        out = out * x
    return out


_VIEW_DIM_CACHE: dict[tuple, int | None] = {}


def view_dim(in_shape, out_shape, d: int, n: int) -> int | None:
    """The output dim that a Shard(d) input maps to through a view, or None."""
    # Symbolic arithmetic is the cost here; identical blocks repeat identical shapes.
    key = (shape_key(in_shape), shape_key(out_shape), d, n)
    if key not in _VIEW_DIM_CACHE:
        _VIEW_DIM_CACHE[key] = _view_dim(in_shape, out_shape, d, n)
    return _VIEW_DIM_CACHE[key]


def _view_dim(in_shape, out_shape, d: int, n: int) -> int | None:
    pre = _prod(in_shape[:d])
    for e in range(len(out_shape)):
        if _eq(out_shape[e], 1) and not _eq(in_shape[d], 1):
            continue
        if not _eq(_prod(out_shape[:e]), pre):
            continue
        # merge: out[e] == in[d] * in[d+1] * ... * in[k]
        acc = in_shape[d]
        for k in range(d, len(in_shape)):
            if k > d:
                acc = acc * in_shape[k]
            if _eq(out_shape[e], acc):
                return e
        # split: in[d] == out[e] * out[e+1] * ... and out[e] divisible by n
        acc = out_shape[e]
        for k in range(e, len(out_shape)):
            if k > e:
                acc = acc * out_shape[k]
            if _eq(in_shape[d], acc):
                # A symbolic size that may or may not divide (the batch) is allowed: the input's own
                # shard already guards it at run time, and a view of a wrong size fails loudly.
                return e if divides(out_shape[e], n) is not False else None
        return None
    return None


def _ceil(a: int, n: int) -> int:
    return -(-a // n)


def _uneven_dim(in_shape, out_shape, d: int, n: int) -> int | None:
    """The output dim e an uneven Shard(d) (torch.chunk's rows: chunk i is [i*c, (i+1)*c), c = ceil(size / n))
    maps to, or None. Exact when the output dim starts at the same flat offset and its own torch.chunk is the
    input's scaled: kept whole; merged with the g elements of the dims after d where ceil(size*g / n) ==
    ceil(size / n) * g (kv heads merged with their q-head repeats); or split with out[e] cut alike."""
    size = in_shape[d]
    if not isinstance(size, int):
        return None
    pre = _prod(in_shape[:d])
    for e in range(len(out_shape)):
        if not _eq(_prod(out_shape[:e]), pre) or (_eq(out_shape[e], 1) and size != 1):
            continue
        if not isinstance(out_shape[e], int):
            return None
        if out_shape[e] == size:
            return e
        if out_shape[e] > size and out_shape[e] % size == 0:  # merged with the dims after d
            g = out_shape[e] // size
            if divides(_prod(in_shape[d + 1:]), g) is True and _ceil(out_shape[e], n) == _ceil(size, n) * g:
                return e
        elif size % out_shape[e] == 0:  # split: out[e] outermost
            g = size // out_shape[e]
            if _ceil(size, n) == _ceil(out_shape[e], n) * g:
                return e
        return None
    return None


def _sections_dim(in_shape, out_shape, d: int, k: int) -> int | None:
    """The output dim e of size k that a view splits input dim d into (k, out[e+1], ...), or None."""
    pre = _prod(in_shape[:d])
    for e in range(len(out_shape) - 1):
        if _eq(out_shape[e], k) and _eq(_prod(out_shape[:e]), pre):
            acc = out_shape[e]
            for j in range(e + 1, len(out_shape)):
                acc = acc * out_shape[j]
                if _eq(acc, in_shape[d]):
                    return e
            return None
    return None


def localize_shape_arg(node: fx.Node, spec: TensorSpec, mesh_sizes, coordinate=None) -> None:
    """Rewrites a view / expand shape argument (args[1]) to this rank's local sizes.

    An uneven dim (torch.chunk's rows: a static size that does not divide) becomes -1 where the
    shape has no other -1 (expand: always, -1 keeps the input's size), else this rank's own rows
    (`coordinate`; the padded size in a dry run)."""
    shape = list(node.args[1])
    divisor = [1] * len(shape)
    uneven_at: dict[int, tuple[int, int]] = {}
    for m, (p, n) in enumerate(zip(spec.placements, mesh_sizes)):
        if p.is_shard() or isinstance(p, _StridedShard):
            divisor[p.dim] *= n
            size = spec.shape[p.dim]
            if p.is_shard() and n > 1 and isinstance(size, int) and size % n:
                uneven_at[p.dim] = (m, n)
    changed = False
    for e, div in enumerate(divisor):
        if div == 1 or (isinstance(shape[e], int) and shape[e] == -1):
            continue
        if e in uneven_at:
            m, n = uneven_at[e]
            if node.target == aten.expand.default or -1 not in shape:
                shape[e] = -1
            elif coordinate is not None:
                shape[e] = chunk_bounds(int(spec.shape[e]), n, coordinate[m])[1]
            else:
                shape[e] = -(-int(spec.shape[e]) // n)
        elif isinstance(shape[e], fx.Node):
            with node.graph.inserting_before(node):
                shape[e] = node.graph.call_function(operator.floordiv, (shape[e], div))
        else:
            shape[e] = shape[e] // div
        changed = True
    if changed:
        node.args = (node.args[0], shape, *node.args[2:])


def _localize_view(node: fx.Node, info, mesh) -> None:
    localize_shape_arg(node, info.spec, mesh.sizes, mesh.coordinate)


@register(aten.view.default, aten.reshape.default, aten._unsafe_view.default, localize=_localize_view, uneven=True)
def view(op: OpInfo, cur) -> list[Strategy]:
    """An uneven shard (torch.chunk's rows, e.g. whole heads: `unflatten_heads`) passes only where each
    rank's chunk stays the output's torch.chunk (`_uneven_dim`): 12 heads of 64 merged at tp=8 would be
    chunks of 128 rows where torch.chunk cuts 96."""
    (c,) = cur[:1]
    out: list[Strategy] = []
    if c is not None and c.is_shard():
        in_shape, out_shape = tuple(op.in_vals[0].shape), tuple(op.out_val.shape)
        if divides(in_shape[c.dim], op.mesh_size) is False:
            e = _uneven_dim(in_shape, out_shape, c.dim, op.mesh_size)
        else:
            e = view_dim(in_shape, out_shape, c.dim, op.mesh_size)
        if e is not None:
            out.append(Strategy((S(c.dim),), S(e)))
    if isinstance(c, _StridedShard):
        # a strided shard survives only a view that keeps its dim whole (same size, same offset)
        in_shape, out_shape = tuple(op.in_vals[0].shape), tuple(op.out_val.shape)
        e = view_dim(in_shape, out_shape, c.dim, op.mesh_size)
        if e is not None and _eq(in_shape[c.dim], out_shape[e]):
            out.append(Strategy((c,), _StridedShard(e, split_factor=c.split_factor)))
        # or one that makes its sections a dim: (..., k*H*D) -> (..., k, H, D) shards H (fused qkv viewed
        # then unbound: chunk r of each section is heads r*H/n.. of each)
        e = _sections_dim(in_shape, out_shape, c.dim, c.split_factor)
        if e is not None and divides(out_shape[e + 1], op.mesh_size) is True:
            out.append(Strategy((c,), S(e + 1)))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out


def _permuted(op: OpInfo, cur, perm: list[int]) -> list[Strategy]:
    """perm[out_dim] = in_dim."""
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard():
        out.append(Strategy((S(c.dim),), S(perm.index(c.dim))))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out


@register(aten.transpose.int, uneven=True)
def transpose(op: OpInfo, cur) -> list[Strategy]:
    ndim = op.in_vals[0].ndim
    d0, d1 = norm_dim(op.args[1], ndim), norm_dim(op.args[2], ndim)
    perm = list(range(ndim))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return _permuted(op, cur, perm)


@register(aten.t.default, uneven=True)
def t(op: OpInfo, cur) -> list[Strategy]:
    return _permuted(op, cur, list(reversed(range(op.in_vals[0].ndim))))


@register(aten.permute.default, uneven=True)
def permute(op: OpInfo, cur) -> list[Strategy]:
    ndim = op.in_vals[0].ndim
    return _permuted(op, cur, [norm_dim(d, ndim) for d in op.args[1]])


@register(aten.unsqueeze.default, uneven=True)
def unsqueeze(op: OpInfo, cur) -> list[Strategy]:
    d = norm_dim(op.args[1], op.out_val.ndim)
    perm = [i for i in range(op.in_vals[0].ndim)]
    perm.insert(d, -1)
    return _permuted(op, cur, perm)


@register(aten.squeeze.dim, aten.squeeze.dims, uneven=True)
def squeeze(op: OpInfo, cur) -> list[Strategy]:
    in_val = op.in_vals[0]
    dims = op.args[1] if isinstance(op.args[1], (list, tuple)) else [op.args[1]]
    dims = {norm_dim(d, in_val.ndim) for d in dims if _eq(in_val.shape[norm_dim(d, in_val.ndim)], 1)}
    perm = [i for i in range(in_val.ndim) if i not in dims]
    c = cur[0]
    if c is not None and c.is_shard() and c.dim in dims:
        return [Strategy((R,), R)]
    return _permuted(op, cur, perm)


def _localize_expand(node: fx.Node, info, mesh) -> None:
    localize_shape_arg(node, info.spec, mesh.sizes, mesh.coordinate)


@register(aten.expand.default, localize=_localize_expand, uneven=True)
def expand(op: OpInfo, cur) -> list[Strategy]:
    in_val, out_val = op.in_vals[0], op.out_val
    offset = out_val.ndim - in_val.ndim
    c = cur[0]
    out: list[Strategy] = []
    if c is not None and c.is_shard() and _eq(in_val.shape[c.dim], out_val.shape[c.dim + offset]):
        out.append(Strategy((S(c.dim),), S(c.dim + offset)))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out


@register(aten.flatten.using_ints, aten.unflatten.int, uneven=True)
def flatten(op: OpInfo, cur) -> list[Strategy]:
    """flatten / unflatten are views: the same dim mapping as view, no shape argument to localize."""
    return view(op, cur)


@register(aten.view_as_complex.default, aten.view_as_real.default)
def complex_view(op: OpInfo, cur) -> list[Strategy]:
    """(..., 2) real <-> (...) complex: every dim but the pair dim keeps its index."""
    c = cur[0]
    pair_dim = op.in_vals[0].ndim - 1 if op.node.target == aten.view_as_complex.default else None
    out: list[Strategy] = []
    if c is not None and c.is_shard() and c.dim != pair_dim:
        out.append(Strategy((S(c.dim),), S(c.dim)))
    if c is not None and c.is_partial():
        out.append(Strategy((P,), P))
    out.append(Strategy((R,), R))
    return out
