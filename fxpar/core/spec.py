"""Per-node fxpar metadata: placements, local shapes, provenance.

All fxpar state on a node lives in `node.meta["fxpar"]` as a frozen `NodeInfo`,
read and written only through the accessors here. Placements are torch's own
`Shard`, `Replicate` and `Partial`, one per mesh dim, as in DTensor.

`node.meta["val"]` keeps the *global* FakeTensor from capture; the spec's
`local_shape` is what this rank holds. For a `Shard(d)` on a mesh dim of size n
the local size of dim d is `global / n` (several mesh dims sharding one tensor
dim divide it in mesh order).

Uneven shards (a parameter dim that does not divide, as FSDP2 and DTensor
allow): rank i holds chunk i of `torch.chunk`, ceil(global / n) rows each, the
last ranks fewer or none (`chunk_bounds`). The spec's `local_shape` is then
the padded size ceil(global / n), the same on every rank (what a padded
collective moves, and the most any rank holds); a rank's own rows come from
`chunk_bounds` / `rank_local_shape`.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Partial, Placement, Replicate, Shard
from torch.fx.experimental.symbolic_shapes import statically_known_true

from fxpar._torch.placements import StridedShard as _StridedShard

__all__ = [
    "META_KEY",
    "FSDP_ROOT_UNIT",
    "TensorSpec",
    "NodeInfo",
    "GradSyncInfo",
    "get_info",
    "set_info",
    "update_info",
    "get_spec",
    "divides",
    "size_key",
    "shape_key",
    "local_size",
    "chunk_bounds",
    "chunk",
    "pad_to",
    "rank_local_shape",
    "uncut_steps",
    "replicated",
    "placements_str",
    "Shard",
    "Replicate",
    "Partial",
    "Placement",
]

META_KEY = "fxpar"


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor value is laid out over the mesh.

    Attributes:
        placements: one placement per mesh dim.
        shape: the global shape (ints or SymInts).
        local_shape: the shape this rank holds.
        dtype: the element type.
    """

    placements: tuple[Placement, ...]
    shape: tuple[Any, ...]
    local_shape: tuple[Any, ...]
    dtype: torch.dtype

    @property
    def is_replicated(self) -> bool:
        return all(p.is_replicate() for p in self.placements)

    def nbytes(self, *, local: bool = False, hint: bool = True) -> int:
        """Bytes of the global (or local) tensor, symbolic sizes at their hints."""
        numel = 1
        for s in self.local_shape if local else self.shape:
            numel *= size_hint(s) if hint else s
        return numel * self.dtype.itemsize

    def __str__(self) -> str:
        return placements_str(self.placements)


@dataclass(frozen=True)
class GradSyncInfo:
    """A parameter whose gradient the runtime sums over data-parallel mesh dims, bucketed.

    Attributes:
        dims: the mesh dim names its gradient is all-reduced over.
        bucket: the index of the flat all-reduce it joins (buckets fire in reverse use order).
        dtype: the dtype the all-reduce runs in, or None for the parameter's own. An HSDP shard under
            mixed precision is summed over dp in the dtype its reduce-scatter over fsdp ran in
            (FSDP2's reduce_dtype, on both dims); the sum lands in the parameter's dtype.
    """

    dims: tuple[str, ...]
    bucket: int
    dtype: torch.dtype | None = None

    def nbytes(self, spec: "TensorSpec") -> int:
        """Bytes one rank sends into the all-reduce for a parameter of local spec `spec`."""
        return spec.nbytes(local=True) // spec.dtype.itemsize * (self.dtype or spec.dtype).itemsize


@dataclass(frozen=True)
class NodeInfo:
    """Everything fxpar records about one node.

    Attributes:
        spec: the output spec (a tuple of specs for multi-output nodes, None
            for non-tensor values).
        input_placements: placements the chosen strategy needs for each tensor
            input, in `node.all_input_nodes` order (None where not a tensor).
        module_fqn: the user module this node came from.
        fallback: the op had no sharding rule and runs on replicated inputs.
        role: 'param', 'input', 'compute', 'collective', 'marker'.
        param_fqn: for parameters and buffers, the original FQN.
        origin: the pass that created or last rewrote this node.
        note: free text for explain(), e.g. why a fallback happened.
        style: on parameters, the tensor-parallel style of their module as explain() and plan
            files print it ('colwise', 'replicate (not sharded: ...)', '...; fsdp shards dim 0').
        fsdp_bucket: on FSDP gathers, the communication unit (a block FQN) they gather with;
            `FSDP_ROOT_UNIT` for the parameters outside any block and the weights used in several blocks
            (apply_fsdp), gathered once at the start of the forward and kept until the backward, as FSDP2's root.
        grad_sync: on parameters whose gradient the runtime all-reduces (bucket_grad_sync).
    """

    spec: TensorSpec | tuple[TensorSpec | None, ...] | None = None
    input_placements: tuple[tuple[Placement, ...] | None, ...] | None = None
    module_fqn: str = ""
    fallback: bool = False
    role: str = "compute"
    param_fqn: str | None = None
    origin: str | None = None
    note: str | None = None
    style: str | None = None
    fsdp_bucket: str | None = None
    grad_sync: GradSyncInfo | None = None


FSDP_ROOT_UNIT = "<root>"
"""The FSDP unit of the parameters outside any block (apply_fsdp, fsdp_unit='block'): FSDP2's root group,
gathered once per step and not resharded after the forward (the runtime, the compiled partitioner, explain,
the timeline and the memory model all read this name)."""


def get_info(node: fx.Node) -> NodeInfo | None:
    """The fxpar info of `node`, or None if no pass has annotated it."""
    info = node.meta.get(META_KEY)
    if info is None:
        origin = node.meta.get("from_node")
        # fx.Transformer / make_fx drop custom meta; recover it from provenance.
        if origin:
            src = origin[-1]
            info = getattr(src, "meta", {}).get(META_KEY) if hasattr(src, "meta") else None
    return info


def set_info(node: fx.Node, info: NodeInfo) -> None:
    node.meta[META_KEY] = info


def update_info(node: fx.Node, **changes: Any) -> NodeInfo:
    """Replaces fields of a node's info (creating a default one if absent)."""
    info = get_info(node) or NodeInfo()
    info = dataclasses.replace(info, **changes)
    set_info(node, info)
    return info


def get_spec(node: fx.Node) -> TensorSpec | None:
    info = get_info(node)
    spec = info.spec if info else None
    return spec if isinstance(spec, TensorSpec) else None


# Symbol -> size bindings that override the example sizes (explain() for other batch / sequence sizes).
SIZE_BINDINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("fxpar_size_bindings", default=None)


def size_hint(s: Any) -> int:
    """An int for a size that may be symbolic: its example value, or its value under SIZE_BINDINGS."""
    if isinstance(s, torch.SymInt):
        bindings = SIZE_BINDINGS.get()
        if bindings:
            value = s.node.expr.xreplace(bindings)
            if isinstance(value, int) or value.is_number:
                return int(value)
        return int(s.node.hint) if s.node.hint is not None else int(s.node.shape_env.size_hint(s.node.expr))
    return int(s)


def size_key(s: Any) -> Any:
    """A hashable stand-in for a size: the int, or a SymInt's sympy expression.

    Equal keys mean equal sizes. Cheap (no printing, no symbolic reasoning), for
    caches and for comparing shapes structurally; SymInts themselves are unhashable.
    """
    return s.node.expr if isinstance(s, torch.SymInt) else s


def shape_key(shape: Sequence[Any]) -> tuple:
    """`size_key` of every entry of a shape."""
    return tuple(s.node.expr if isinstance(s, torch.SymInt) else s for s in shape)


def divides(size: Any, n: int) -> bool | None:
    """True / False when `size % n == 0` is decidable, None when it depends on the input."""
    if n == 1:
        return True
    if isinstance(size, torch.SymInt):
        if statically_known_true(size % n == 0):
            return True
        if statically_known_true(size % n != 0):
            return False
        return None
    return int(size) % n == 0


def local_size(size: Any, n: int) -> Any:
    """The local size of a dim split over n ranks: size / n, or ceil(size / n) padded for a static uneven size."""
    if n == 1:
        return size
    if isinstance(size, torch.SymInt) or size % n == 0:
        return size // n
    return -(-size // n)


def chunk_bounds(size: int, n: int, i: int) -> tuple[int, int]:
    """(start, length) of chunk `i` of a dim of `size` split over `n` ranks, as `torch.chunk`, DTensor's
    Shard and FSDP2 cut it: ceil(size / n) each, the last ranks fewer or none (3 rows on 4 ranks: 1, 1, 1, 0)."""
    c = -(-size // n)
    start = min(i * c, size)
    return start, min(c, size - start)


def chunk(t: torch.Tensor, n: int, dim: int, i: int) -> torch.Tensor:
    """Chunk `i` of `n` of `t` along `dim` (`chunk_bounds`; empty where torch.chunk has no chunk `i`)."""
    return t.narrow(dim, *chunk_bounds(t.size(dim), n, i))


def pad_to(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`x` with zeros appended along `dim` up to `size` (an uneven chunk padded for a collective)."""
    if x.size(dim) == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.size(dim)
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def uncut_steps(shape: Sequence[Any], placements: Sequence[Placement], sizes: Sequence[int],
                coordinate: Sequence[int], names: Sequence[str]) -> list[tuple[int, Placement, int]]:
    """How to rebuild a full tensor from this rank's shard: (mesh dim, placement, size of the placement's dim
    after gathering it), last cut first. Shards are cut in `shard_order` (fsdp last); an uneven cut's
    gather strips its padding down to that size."""
    cur = [size_hint(s) for s in shape]
    steps = []
    for m in shard_order(names):
        p = placements[m]
        if p.is_replicate() or not (p.is_shard() or isinstance(p, _StridedShard)):
            continue
        before = cur[p.dim]
        cur[p.dim] = chunk_bounds(before, sizes[m], coordinate[m])[1] if p.is_shard() else before // sizes[m]
        steps.append((m, p, before))
    return steps[::-1]


def rank_local_shape(spec: "TensorSpec", sizes: Sequence[int], coordinate: Sequence[int],
                     names: Sequence[str]) -> tuple[int, ...]:
    """The shape this rank holds of a tensor laid out as `spec` (its own rows of an uneven shard)."""
    cur = [size_hint(s) for s in spec.shape]
    for m in shard_order(names):
        p = spec.placements[m]
        if p.is_shard():
            cur[p.dim] = chunk_bounds(cur[p.dim], sizes[m], coordinate[m])[1]
        elif isinstance(p, _StridedShard):
            cur[p.dim] //= sizes[m]
    return tuple(cur)


def replicated(ndim: int) -> tuple[Placement, ...]:
    return tuple(Replicate() for _ in range(ndim))


def placements_str(placements: Sequence[Placement]) -> str:
    def one(p: Placement) -> str:
        if isinstance(p, Shard):
            return f"S({p.dim})"
        if isinstance(p, _StridedShard):
            return f"S({p.dim}, x{p.split_factor})"
        if isinstance(p, Partial):
            return "P"
        return "R"

    return "[" + ", ".join(one(p) for p in placements) + "]"


def shard_order(names: Sequence[str]) -> list[int]:
    """Mesh dims in the order parameters are cut: fsdp last, so gathering over fsdp yields the
    tensor-parallel shard (FSDP2 + TP's 'right-to-left' sharding)."""
    return sorted(range(len(names)), key=lambda m: names[m] == "fsdp")


def make_spec(val: Any, placements: tuple[Placement, ...], mesh_sizes: Sequence[int]) -> TensorSpec:
    """A spec for a FakeTensor `val` laid out as `placements`; no divisibility check."""
    shape = tuple(val.shape)
    local = shape
    for p, n in zip(placements, mesh_sizes):
        # Replicate first: a failed isinstance against placement types is slow (their metaclass)
        if n != 1 and p is not None and not p.is_replicate() and isinstance(p, (Shard, _StridedShard)):
            if local is shape:
                local = list(shape)
            local[p.dim] = local_size(local[p.dim], n)
    return TensorSpec(tuple(placements), shape, tuple(local), val.dtype)
