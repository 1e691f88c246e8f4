"""async_tp: split the batch into chunks whose tensor-parallel all-reduces run under the other chunk's compute.

Requires: local_params (after shard_parameters). Provides: async_tp.

In a Megatron graph every all-reduce sits on the critical path: the row-parallel
matmul before it produces its input, and the residual add after it needs its
output; there is nothing to run while the sum is in flight. Splitting the batch
gives that independent work (Domino, Wang et al. 2024): the rows of a batch
never mix in a transformer's forward, so the graph is copied once per batch
chunk and the copies are interleaved so that chunk c's all-reduce is in flight
while chunk c+1 computes. With k chunks and all-reduces A_1..A_m cutting the
forward into stages S_0..S_m, the order is

    S_0(c0) A_1(c0)^  S_0(c1) A_1(c1)^  A_1(c0)v S_1(c0) A_2(c0)^  A_1(c1)v S_1(c1) A_2(c1)^ ...

(^ issue, v wait): every all-reduce but the last chunk's last one overlaps a
chunk's stage. Each node copy is sorted by (stage, chunk, original position),
the wait of an all-reduce at the start of the next stage of its chunk, just
before the first use of its value.

Which nodes are split (`_row_wise`): starting from the batch inputs (placeholders
whose dim 0 is the symbolic batch size B), a node is copied per chunk when it
computes each batch row from the same row of its chunked inputs: its output's
dim 0 is B and its op is in a short list checked argument by argument (linear,
norms over trailing dims, pointwise ops with broadcast parameters, views that
keep dim 0, attention, embeddings, fxpar's collectives on other dims). Scalars
derived from B (view sizes) are recomputed per chunk. Any other node that
consumes split values gets them concatenated back along dim 0 (`cat`, once per
value), and so does every node after it: the split region ends there, never
wrong, only less split. The chunks are `narrow`s of B // k rows (the last takes
the rest).

Before (one block's MLP):
    %linear_5_nobias = aten.linear(%gelu, %w)
    %allreduce_linear_5_nobias = fxpar.all_reduce(%linear_5_nobias, '0', 'tp')
    %add_2 = aten.add(%add_1, %allreduce_linear_5_nobias ...)
After (k = 2):
    %linear_5_nobias_c0 = aten.linear(%gelu_c0, %w)
    %allreduce_start_linear_5_nobias_c0 = fxpar.all_reduce_start(%linear_5_nobias_c0, '0', 'tp')
    ... %gelu_c1, %linear_5_nobias_c1, %allreduce_start_linear_5_nobias_c1 ...
    %allreduce_linear_5_nobias_c0 = _c10d_functional.wait_tensor(%allreduce_start_linear_5_nobias_c0)
    %add_2_c0 = aten.add(%add_1_c0, %allreduce_linear_5_nobias_c0 ...)

Sequence parallel (`Plan(sequence_parallel=True)`): its gather before a
column-parallel matmul and its reduce-scatter after a row-parallel one act
along the sequence, each batch row on its own, so they are split and issued
the same way (`fxpar.sp_all_gather_start`, `fxpar.reduce_scatter_start`,
fxpar.ops.async_tp), cutting the forward into stages as the all-reduces do:

    attn(c0) RS(c0)^ attn(c1) RS(c1)^ RS(c0)v norm(c0) AG(c0)^ RS(c1)v norm(c1) AG(c1)^ AG(c0)v mlp(c0) ...

Between a reduce-scatter and the next gather only a norm runs: chunk 0's
reduce-scatter and the last chunk's gather run under a matmul stage, the
others under a norm. The embedding's reduce-scatter (a lookup before it, a
norm after it) does not pay and keeps waiting (below).

Invariants kept: every value equals the unsplit graph's (each row is computed by
the same ops on the same row), gradients too (the duals are per chunk: an issued
all-reduce's backward is the identity, as `fxpar.all_reduce`'s; an issued
gather's is the reduce-scatter and an issued reduce-scatter's the gather, as the
waiting ops'); every rank has the same graph, so the same collectives in the
same order; the bytes communicated are the same, in k times as many collectives
for those inside the split region.

Off in the default pipeline (`async_tp` has chunks=1: not measured faster yet, see
there); `AsyncTP()` turns it on. Gated per collective by the cost model
(`fxpar.analysis.cost`, `AsyncTP._gate`): a collective is issued when its chunk
has at least `min_chunk_bytes` and a stage next to it at least
`min_chunk_flops` per chunk to hide it; one that does not pay stays a waiting
call per chunk. Off with `overlap=False`, under
`compile=True` (inductor schedules its own collectives), with pipelines,
FSDP, activation checkpointing or offloading, and in graphs with
a collective that does not depend on the batch (it would move before the split
region) or one on the whole batch before the last one issued (a gather of
logits ends the region; before it, it would leave the rest unsplit).
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from dataclasses import dataclass
from typing import Any, ClassVar

import sympy
import torch
import torch.fx as fx

from fxpar._torch.fx import copy_codegen
from fxpar.analysis.cost import evaluate, example_sizes, node_cost, size_expr
from fxpar.core.pass_api import PassContext, PassResult
from fxpar.core.spec import TensorSpec, get_info, set_info
from fxpar.ops.async_tp import ASYNC_OPS, ISSUED_FORM, WAIT_OP
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.overlap import ISSUE_OPS

__all__ = ["AsyncTP", "async_tp"]

log = logging.getLogger(__name__)

aten = torch.ops.aten
fxp = torch.ops.fxpar
_SP_COMMS = {fxp.sp_all_gather.default, fxp.reduce_scatter.default}
"""Sequence parallel's collectives: issued async when they act along another dim than the batch."""

_POINTWISE = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.gelu.default, aten.relu.default, aten.silu.default,
    aten.tanh.default, aten.sigmoid.default, aten.exp.default, aten.rsqrt.default, aten.sqrt.default,
    aten.pow.Tensor_Scalar, aten.where.self, aten.clone.default, aten.contiguous.default, aten._to_copy.default,
    aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.detach.default, aten.alias.default,
    aten.masked_fill.Scalar, aten.square.default, aten.reciprocal.default, aten.erf.default, aten.log.default,
    aten.sin.default, aten.cos.default, aten.abs.default, aten.maximum.default, aten.minimum.default,
    fxp.all_reduce.default, fxp.all_reduce_max.default, fxp.grad_all_reduce.default,
}
"""Elementwise (over dim 0 at least): row b of the output reads row b of each input."""

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_DIM_ARG = {  # ops that act along one dim given as an argument (position): fine unless it is dim 0
    aten.transpose.int: (1, 2), aten.softmax.int: (1,), aten._softmax.default: (1,), aten.log_softmax.int: (1,),
    aten._log_softmax.default: (1,), aten.slice.Tensor: (1,), aten.narrow.default: (1,), aten.select.int: (1,),
    aten.squeeze.dim: (1,), aten.cumsum.default: (1,),
    fxp.shard.default: (1,),
}
_DIMS_ARG = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.var.correction}
_SYNC_COMMS = {fxp.all_gather.default, fxp.sp_all_gather.default, fxp.reduce_scatter.default, fxp.all_to_all.default}
"""Collectives that communicate in the forward and stay one call on the whole batch (joined first), but for
sequence parallel's along the sequence (`_SP_COMMS`)."""
_HEAVY = {aten.linear.default, aten.matmul.default, aten.scaled_dot_product_attention.default}
"""The ops whose FLOPs the gate counts as work to overlap."""
_SYM_OPS = {aten.sym_size.int, operator.mul, operator.add, operator.sub, operator.floordiv, operator.mod,
            operator.neg}


@dataclass(frozen=True)
class AsyncTP:
    """The pass, with its options (`async_tp`, the default pipeline's instance, is off: chunks=1).

    Attributes:
        chunks: batch chunks k (each all-reduce becomes k, of 1/k of the bytes).
        min_chunk_bytes: smallest all-reduce chunk worth splitting for (below it, the collective's
            fixed latency dominates and k calls cost more than one).
        min_chunk_flops: smallest compute per chunk and stage that must be there to hide a chunk's
            all-reduce (matmul and attention FLOPs, `fxpar.analysis.cost.node_cost`).
    """

    chunks: int = 2
    min_chunk_bytes: int = 64 * 1024
    min_chunk_flops: float = 2e7

    name: ClassVar[str] = "async_tp"
    requires: ClassVar[frozenset] = frozenset({"local_params"})
    provides: ClassVar[frozenset] = frozenset({"async_tp"})

    def __call__(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        why = _off_reason(gm, ctx)
        if why is None:
            split = _Split.find(gm, self.chunks)
            why = split.why if split.why else self._gate(gm, split)
        if why is not None:
            log.debug("async_tp: not splitting (%s)", why)
            return PassResult(gm, False)
        try:
            graph = split.build()
        except _Refused as e:  # a copy whose shapes do not follow the chunk: left unsplit
            log.debug("async_tp: not splitting (%s)", e)
            return PassResult(gm, False)
        gm.graph = graph
        gm.recompile()
        return PassResult(gm, True)

    def _gate(self, gm: fx.GraphModule, split: "_Split") -> str | None:
        """Keeps waiting (one call per chunk, `_Split.waiting`) each collective that does not pay at the example
        sizes (cost model); None if some are left to issue, else why not.

        A collective pays when its chunk has min_chunk_bytes and a stage next to it has min_chunk_flops per
        chunk to hide it: in the module docstring's order, chunk c's collective runs under the stage before it
        of chunk c + 1, and the last chunk's under the stage after it of chunk 0. Without sequence parallel
        every stage is a matmul's; with it, the norm stage between a reduce-scatter and the next gather is
        not, and each of those two collectives is hidden on one side only (the embedding's reduce-scatter, with
        a lookup before it and a norm after it, on neither: it keeps waiting). A collective kept waiting joins
        its stages, so the check repeats until every collective left pays."""
        hints = example_sizes(gm)
        why = None
        while split._async():
            stages = split.stage_costs(hints)
            slow = {}
            for j, (node, nbytes) in enumerate(split.collective_bytes(hints)):
                if nbytes / self.chunks < self.min_chunk_bytes:
                    slow[node] = f"%{node.name}'s chunk of {nbytes / self.chunks:.0f} B is under min_chunk_bytes"
                elif max(stages[j], stages[j + 1]) / self.chunks < self.min_chunk_flops:
                    slow[node] = (f"%{node.name} has {max(stages[j], stages[j + 1]) / self.chunks:.3g} FLOPs per "
                                  "chunk next to it, under min_chunk_flops")
            if not slow:
                return None
            for node, why in slow.items():
                log.debug("async_tp: %s: it keeps waiting", why)
            split.waiting.update(slow)
        return why


async_tp = AsyncTP(chunks=1)
"""The default pipeline's instance: off. Measured on 2 gloo ranks (benchmarks/overlap.py's GPT, interleaved,
a 2-core machine: each rank's core also runs gloo's copies, so nothing is idle to hide a transfer behind) the
split was no faster than the unsplit graph in two runs of 16 and 20 interleaved steps (medians, slowest rank):
training step 1.12 and 1.17x, forward 1.07 and 1.01x; with sequence parallel 1.16 and 1.17x, forward 1.12 and
0.98x (k times the collectives and the autograd nodes, matmuls of half the rows). Turn it on with
`passes=[AsyncTP() if p is async_tp else p for p in fxpar.default_passes()]`."""


def _off_reason(gm: fx.GraphModule, ctx: PassContext) -> str | None:
    o = ctx.options
    if not o.get("overlap", True):
        return "overlap=False"
    if o.get("compile"):
        return "compile=True: inductor schedules the collectives"
    if o.get("pp") is not None or o.get("activation_checkpointing") or o.get("offload_policy") is not None:
        return "pipeline, activation checkpointing or offloading"
    if any(n.op == "call_function" and (n.target in ISSUE_OPS or n.target in ASYNC_OPS
                                        or n.target is fxp.fsdp_all_gather.default) for n in gm.graph.nodes):
        return "FSDP gathers or issued collectives already in the graph"
    if not any(n.target in ISSUED_FORM for n in gm.graph.nodes):
        return "no all-reduce, nor sequence parallel's gather and reduce-scatter"
    return None


class _Refused(Exception):
    pass


def _dim0(val: Any) -> sympy.Expr | None:
    return size_expr(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() >= 1 else None


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class _Split:
    """Which nodes are copied per chunk (the region), which consume the joined values, and the new graph."""

    def __init__(self, gm: fx.GraphModule, chunks: int) -> None:
        self.gm, self.k = gm, chunks
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.roots: list[fx.Node] = []
        self.region: set[fx.Node] = set()   # copied per chunk
        self.tainted: set[fx.Node] = set()  # after the region: consume joined values
        self.waiting: set[fx.Node] = set()  # collectives in the region that stay one waiting call per chunk
        self.batch: sympy.Expr | None = None
        self.why: str | None = None

    @classmethod
    def find(cls, gm: fx.GraphModule, chunks: int) -> "_Split":
        s = cls(gm, chunks)
        s.why = s._classify()
        return s

    # ------------------------------------------------------------------ classification

    def _classify(self) -> str | None:
        if self.k < 2:
            return f"chunks={self.k}"
        for n in self.nodes:
            if n.op != "placeholder":
                continue
            b = _dim0(n.meta.get("val"))
            if b is None or not b.free_symbols:
                continue
            if self.batch is None:
                self.batch = b
            if b == self.batch:
                self.roots.append(n)
        if not self.roots:
            return "no input with a symbolic batch dim"
        self.region.update(self.roots)
        for n in self.nodes:
            if n.op in ("placeholder", "get_attr", "output") or n in self.region:
                continue
            ins = n.all_input_nodes
            if any(i in self.tainted for i in ins):
                self.tainted.add(n)
            elif not any(i in self.region for i in ins):
                continue  # independent of the batch (parameters, constants, sizes of other dims)
            elif self._batch_free_scalar(n) and all(i in self.roots or i not in self.region for i in ins):
                continue  # a size of another dim of an input (the sequence length): the same for every chunk
            elif self._row_wise(n) or self._scalar(n):
                self.region.add(n)
            elif n.op == "call_module" and n.meta.get("val") is None and not n.users \
                    and all(i in self.roots or i not in self.region for i in ins):
                continue  # the capture's input guard: reads the whole inputs, returns nothing
            else:
                self.tainted.add(n)
        if not self._async():
            return "no all-reduce (or sequence parallel gather / reduce-scatter) in the batch-split region"
        last = max(self.index[n] for n in self._async())
        for n in self.nodes:  # the region would end there, the collectives after it unsplit
            if n.target in _SYNC_COMMS and n not in self.region and self.index[n] < last:
                return f"%{n.name} ({COLLECTIVE_OPS[n.target]}) on the whole batch before the last issued collective"
        for n in self.nodes:  # one independent of the batch would move before the split ones (an FSDP gather);
            # an identity forward (grad_all_reduce, shard, replica_grad_sum) may: its backward keeps graph order
            if n.op == "call_function" and n.target in COLLECTIVE_OPS and n not in self.region and n not in \
                    self.tainted and COLLECTIVE_OPS[n.target] not in ("grad_all_reduce", "shard", "replica_grad_sum"):
                return f"collective %{n.name} outside the batch-split region"
        for n in self.region:
            if self._scalar(n) and any(u not in self.region for u in n.users) and \
                    not all(i in self.roots or (self._scalar(i) and i in self.region) for i in n.all_input_nodes):
                return f"size %{n.name} of a split value used outside the region"
        return None

    def _batch_free_scalar(self, n: fx.Node) -> bool:
        v = n.meta.get("val")
        return isinstance(v, (torch.SymInt, int)) and not (size_expr(v).free_symbols & self.batch.free_symbols)

    def _scalar(self, n: fx.Node) -> bool:
        return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _SYM_OPS \
            and isinstance(n.meta.get("val"), (torch.SymInt, int))

    def _split_tensor(self, a: Any) -> bool:
        return isinstance(a, fx.Node) and a in self.region and isinstance(a.meta.get("val"), torch.Tensor)

    def _broadcasts(self, a: Any, ndim: int) -> bool:
        """A non-split input that broadcasts over the batch: fewer dims, or size 1 in dim 0."""
        if not isinstance(a, fx.Node):
            return True
        if a in self.region:
            return self._split_tensor(a) or self._scalar(a)
        v = a.meta.get("val")
        if not isinstance(v, torch.Tensor):
            return True
        return v.dim() < ndim or (v.dim() == ndim and isinstance(v.shape[0], int) and v.shape[0] == 1)

    def _row_wise(self, n: fx.Node) -> bool:
        """True if row b of n's output is computed from row b of its split inputs only (module docstring)."""
        if n.op != "call_function":
            return False
        val = n.meta.get("val")
        if _dim0(val) != self.batch:
            return False
        t, a = n.target, n.args
        ndim = val.dim()
        if t not in _VIEWS and t is not aten.expand.default and \
                any(self._batch_scalar(x) for x in _flat(a, n.kwargs)):
            return False  # the batch size as a value (x / B): a chunk would use its own
        if t in _POINTWISE:
            return all(self._broadcasts(x, ndim) for x in _flat(a, n.kwargs))
        if t in _SP_COMMS:  # along the sequence (or features): each batch row gathered / scattered on its own
            return len(a) == 5 and not n.kwargs and self._split_tensor(a[0]) and _norm(a[1], ndim) != 0
        if t in _SYNC_COMMS:  # joined first: one collective on the whole batch (a logits gather at the end)
            return False
        x0 = a[0] if a else None
        if not self._split_tensor(x0):
            if t is aten.embedding.default or t is fxp.vocab_parallel_embedding.default:
                return self._split_tensor(a[1]) and not self._any_split(a[:1] + a[2:], n.kwargs)
            return False
        in_ndim = x0.meta["val"].dim()
        rest = (a[1:], n.kwargs)
        if t is aten.linear.default:
            return not self._any_split(*rest)
        if t in (aten.layer_norm.default, aten.rms_norm.default):
            return len(a[1]) < in_ndim and not self._any_split(*rest)
        if t in _VIEWS:  # the chunk's rows at index 0 of the size (or -1); every other size the same per chunk
            return _dim0(x0.meta["val"]) == self.batch and self._sizes_follow(a[1])
        if t in _DIM_ARG:
            dims = [a[p] if p < len(a) else None for p in _DIM_ARG[t]]
            return all(isinstance(d, int) and _norm(d, in_ndim) != 0 for d in dims) \
                and not self._any_split(a[1:], n.kwargs, scalars_ok=True) \
                and not any(self._batch_scalar(x) for x in _flat(a[1:], n.kwargs))
        if t is aten.permute.default:
            return _norm(a[1][0], in_ndim) == 0
        if t is aten.unsqueeze.default:
            return _norm(a[1], in_ndim + 1) != 0
        if t in _DIMS_ARG:
            dims = a[1] if len(a) > 1 else None
            return isinstance(dims, (list, tuple)) and len(dims) > 0 and \
                all(_norm(d, in_ndim) != 0 for d in dims)
        if t is aten.expand.default:
            return _dim0(x0.meta["val"]) == self.batch and self._sizes_follow(a[1])
        if t is aten.scaled_dot_product_attention.default:
            q, k, v = a[:3]
            mask = a[3] if len(a) > 3 else n.kwargs.get("attn_mask")
            p = a[4] if len(a) > 4 else n.kwargs.get("dropout_p", 0.0)
            return self._split_tensor(k) and self._split_tensor(v) and p == 0.0 and \
                (mask is None or self._split_tensor(mask) or self._broadcasts(mask, 4))
        if t is aten.dropout.default:
            return a[1] == 0.0 or not a[2]
        if t is aten.matmul.default:  # dim 0 a batch dim of both, or a weight: never contracted over
            other = a[1].meta.get("val") if isinstance(a[1], fx.Node) else None
            if not isinstance(other, torch.Tensor) or in_ndim < 2:
                return False
            if self._split_tensor(a[1]):
                return in_ndim >= 3 and other.dim() == in_ndim
            return other.dim() <= 2
        return False

    def _batch_scalar(self, x: Any) -> bool:
        """A size derived from the batch (the chunk's rows in a copy)."""
        return isinstance(x, fx.Node) and x in self.region and self._scalar(x) and not self._batch_free_scalar(x)

    def _sizes_follow(self, sizes: Any) -> bool:
        """A view / expand size list: no split tensor in it, and a batch-derived size at index 0 only."""
        return isinstance(sizes, (list, tuple)) and len(sizes) > 0 and \
            not any(self._split_tensor(s) for s in sizes) and not any(self._batch_scalar(s) for s in sizes[1:])

    def _any_split(self, args: Any, kwargs: Any = None, *, scalars_ok: bool = False) -> bool:
        return any(self._split_tensor(x) or (not scalars_ok and isinstance(x, fx.Node) and x in self.region
                                              and not self._split_tensor(x))
                   for x in _flat(args, kwargs or {}))

    # ------------------------------------------------------------------ cost gate

    def _async(self) -> list[fx.Node]:
        """The collectives issued async, in graph order (the stage cuts)."""
        return sorted((n for n in self.region if n.target in ISSUED_FORM and n not in self.waiting),
                      key=self.index.__getitem__)

    def collective_bytes(self, hints: dict) -> list[tuple[fx.Node, float]]:
        return [(n, evaluate(node_cost(n).comm_bytes, hints)) for n in self._async()]

    def stage_costs(self, hints: dict) -> list[float]:
        """Matmul and attention FLOPs of the split region per stage (between two consecutive issued
        collectives): the work that can hide a chunk's collective (a norm or a bias add alone is too short to)."""
        cuts = [self.index[n] for n in self._async()]
        out = [0.0] * (len(cuts) + 1)
        for n in self.region:
            if n.op == "call_function" and n.target in _HEAVY:
                out[sum(c < self.index[n] for c in cuts)] += evaluate(node_cost(n).flops, hints)
        return out

    # ------------------------------------------------------------------ the new graph

    def build(self) -> fx.Graph:
        old = self.gm.graph
        g = fx.Graph(owning_module=self.gm, tracer_cls=old._tracer_cls)
        copy_codegen(old, g)  # the capture's pytree in/out handling
        fake_mode = self.roots[0].meta["val"].fake_mode
        env: dict[fx.Node, fx.Node] = {}  # prefix nodes and the roots (shared by the chunks)
        for n in self.nodes:  # prefix: everything the split region reads that is not itself split
            if n.op == "output" or (n in self.region and n not in self.roots) or n in self.tainted:
                continue
            env[n] = g.node_copy(n, lambda x: env[x])
        chunk_env: list[dict[fx.Node, fx.Node]] = [dict() for _ in range(self.k)]
        for r in self.roots:
            size = _new(g, aten.sym_size.int, (env[r], 0), f"{r.name}_rows", fake_mode)
            step = _new(g, operator.floordiv, (size, self.k), f"{r.name}_chunk_rows", fake_mode)
            for c in range(self.k):
                start = 0 if c == 0 else _new(g, operator.mul, (step, c), f"{r.name}_start_c{c}", fake_mode)
                length = step if c < self.k - 1 else _new(g, operator.sub, (size, start), f"{r.name}_rows_c{c}",
                                                          fake_mode)
                chunk_env[c][r] = _new(g, aten.narrow.default, (env[r], 0, start, length), f"{r.name}_c{c}",
                                       fake_mode, like=r)
        rows = [chunk_env[c][self.roots[0]].meta["val"].shape[0] for c in range(self.k)]  # SymInts
        cuts = [self.index[n] for n in self._async()]
        entries = []  # ((stage, chunk, position), what, chunk, original node): sorted, a topological order
        for c in range(self.k):
            for n in sorted((n for n in self.region if n not in self.roots), key=self.index.__getitem__):
                stage = sum(p < self.index[n] for p in cuts)
                if n.target in ISSUED_FORM and n not in self.waiting:  # issued, waited at the next stage's start
                    entries += [((stage, c, self.index[n]), "issue", c, n), ((stage + 1, c, self.index[n]), "wait", c, n)]
                else:
                    entries.append(((stage, c, self.index[n]), "copy", c, n))
        issued: dict[tuple[int, fx.Node], fx.Node] = {}
        for _, what, c, n in sorted(entries, key=lambda e: e[0]):
            ce = chunk_env[c]
            look = lambda x, ce=ce: ce[x] if x in ce else env[x]  # noqa: E731
            if what == "issue":
                issued[c, n] = _new(g, ISSUED_FORM[n.target], fx.node.map_arg(n.args, look), f"{_issue_name(n)}_c{c}",
                                    fake_mode, like=n, kwargs=fx.node.map_arg(n.kwargs, look))
            elif what == "wait":
                ce[n] = _new(g, WAIT_OP, (issued[c, n],), f"{n.name}_c{c}", fake_mode, like=n)
            else:
                new = g.create_node("call_function", n.target, fx.node.map_arg(n.args, look),
                                    fx.node.map_arg(n.kwargs, look), name=f"{n.name}_c{c}")
                new.meta = dict(n.meta)
                _propagate(new, n, fake_mode, rows[c])
                new.args = _sized(n, new.args)  # after the FakeTensor run: values hold global shapes
                ce[n] = new
        joined: dict[fx.Node, fx.Node] = {}

        def join(x: fx.Node) -> fx.Node:
            if x not in self.region or x in self.roots:
                return env[x]
            if x not in joined:
                if self._scalar(x):  # a size: recomputed on the whole inputs (only roots and sizes above it)
                    joined[x] = g.node_copy(x, join)
                else:
                    joined[x] = _new(g, aten.cat.default, ([chunk_env[c][x] for c in range(self.k)], 0),
                                     f"{x.name}_joined", fake_mode, like=x, keep_val=True)
                    info = get_info(joined[x])
                    if info is not None and isinstance(info.spec, TensorSpec):  # cat keeps x's placements
                        set_info(joined[x], dataclasses.replace(
                            info, input_placements=(info.spec.placements,) * self.k, role="compute"))
            return joined[x]

        for n in self.nodes:
            if n in self.tainted or n.op == "output":
                env[n] = g.node_copy(n, join)
        return g


def _sized(n: fx.Node, args: tuple) -> tuple:
    """A view's -1 replaced by its local size where that is a constant: a chunk may be empty (a batch smaller
    than the chunk count), and a view of 0 elements cannot infer a -1."""
    info = get_info(n)
    spec = info.spec if info is not None else None
    if n.target not in _VIEWS or not isinstance(spec, TensorSpec) or -1 not in list(args[1]):
        return args
    sizes = [spec.local_shape[i] if s == -1 and isinstance(spec.local_shape[i], int) else s
             for i, s in enumerate(args[1])]
    return (args[0], sizes, *args[2:])


def _flat(args: Any, kwargs: Any) -> list:
    out: list = []
    fx.node.map_aggregate((args, kwargs), lambda x: out.append(x) or x)
    return out


def _issue_name(n: fx.Node) -> str:
    """%allreduce_X -> allreduce_start_X (and so for spgather_X, reducescatter_X); start_<name> otherwise."""
    head, sep, tail = n.name.partition("_")
    return f"{head}_start_{tail}" if sep and head in ("allreduce", "spgather", "reducescatter") else f"start_{n.name}"


def _vals(args: Any) -> Any:
    return fx.node.map_arg(args, lambda x: x.meta.get("val"))


def _new(g: fx.Graph, target: Any, args: tuple, name: str, fake_mode: Any, *, like: fx.Node | None = None,
         kwargs: dict | None = None, keep_val: bool = False) -> fx.Node:
    """A new call_function node with its FakeTensor value (and `like`'s fxpar info, shape updated)."""
    node = g.create_node("call_function", target, args, kwargs or {}, name=name)
    with fake_mode:
        if keep_val:
            node.meta["val"] = like.meta["val"]
        elif target in COLLECTIVE_OPS or target is WAIT_OP:  # global shapes, as every value's (see _propagate)
            node.meta["val"] = like.meta["val"].new_empty((args[0].meta["val"].shape[0], *like.meta["val"].shape[1:]))
        else:
            node.meta["val"] = target(*_vals(args), **_vals(kwargs or {}))
    if like is not None:
        for key in ("nn_module_stack", "stack_trace", "from_node"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
        _set_chunk_info(node, like, origin="async_tp")
    return node


def _propagate(new: fx.Node, old: fx.Node, fake_mode: Any, rows: Any) -> None:
    """The copy's FakeTensor value, run on its chunked inputs: the original's shape with `rows` in dim 0."""
    ref = old.meta.get("val")
    try:
        with fake_mode:
            if new.target in COLLECTIVE_OPS:  # values hold global shapes: a collective's fake would change them
                val = ref.new_empty((rows, *ref.shape[1:]))
            else:
                val = new.target(*_vals(new.args), **_vals(new.kwargs))
    except Exception as e:  # a shape argument that does not follow the chunk (a constant batch size)
        raise _Refused(f"%{old.name} does not run on a chunk: {type(e).__name__}: {e}") from e
    if isinstance(ref, torch.Tensor):
        if not isinstance(val, torch.Tensor) or val.dim() != ref.dim() or size_expr(val.shape[0]) != size_expr(rows) or \
                [size_expr(s) for s in val.shape[1:]] != [size_expr(s) for s in ref.shape[1:]]:
            raise _Refused(f"%{old.name}'s chunk has shape {getattr(val, 'shape', val)}, not {ref.shape} but dim 0")
    new.meta["val"] = val
    _set_chunk_info(new, old, origin=None)


def _set_chunk_info(new: fx.Node, old: fx.Node, origin: str | None) -> None:
    info = get_info(old)
    if info is None:
        return
    changes: dict[str, Any] = {}
    val = new.meta.get("val")
    if isinstance(info.spec, TensorSpec) and isinstance(val, torch.Tensor):
        spec = info.spec  # dim 0 (the batch) is not sharded in the split region: local rows = global rows
        rows = val.shape[0]
        changes["spec"] = dataclasses.replace(spec, shape=(rows, *spec.shape[1:]),
                                              local_shape=(rows, *spec.local_shape[1:]))
    if origin is not None:
        changes["origin"] = origin
        if new.target in ASYNC_OPS or new.target is WAIT_OP:
            changes["role"] = "collective"
    set_info(new, dataclasses.replace(info, **changes))
