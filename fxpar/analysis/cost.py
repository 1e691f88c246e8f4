"""The cost model behind stage balancing (not a pass; used by split_stages).

Every size below is a sympy expression of the graph's symbolic input sizes
(`s0` = batch, `s1` = sequence, ... as torch.export names them), taken from
the node's *local* shape (its spec's `local_shape`, so a tensor-parallel rank
is charged for its shard only). Costs are evaluated for the example inputs by
substituting the symbols' example values (`evaluate`).

Per node n, with output O and tensor inputs I_1..I_k (numel = product of sizes,
nbytes = numel * itemsize):

    FLOPs(n) =  2 * numel(O) * K              linear, addmm, mm, bmm, matmul;
                                              K = the contracted size       (`_matmul_flops`)
             =  2 * prod(q[:-1]) * S * (E + Ev)
                                              scaled_dot_product_attention,
                                              q [.., L, E], k [.., S, E],
                                              v [.., S, Ev]                  (`_attention_flops`)
             =  2 * numel(O) * (C_in / groups) * prod(kernel)
                                              convolution                    (`_conv_flops`)
             =  2 * T * k * 3 * H * I         a fused MoE node (`moe_experts`): each of the T local
                                              tokens' k routed slots through one expert's gate,
                                              up (H -> I) and down (I -> H) matmuls, I the local
                                              expert width (balanced routing under ep: a rank
                                              computes as many slots as it sends)  (`_moe_cost`)
             =  0                             views, getitem, embedding,
                                              collectives                    (`_ZERO_FLOP`)
             =  sum numel(outputs)            everything else (elementwise,
                                              norms, reductions)             (`node_cost`)
    Mem(n)   =  sum nbytes(I_i) + nbytes(O)    bytes read and written; 0 for views
                + T * k * (2 H + 3 I) * itemsize
                                              a MoE node's routed rows and expert hidden values
    Comm(n)  =  nbytes(O) x copies(n)         fxpar collectives (payload per rank; copies: 1, or a kv
                                              replica sum's slots, `dual_copies`)
             =  2 (ep - 1) / ep * T * k * H * itemsize
                                              a MoE node's token dispatch and combine on ep
                                              (`fxpar.ops.moe.moe_all_to_all_bytes`)

    Time(n)  =  Max(FLOPs(n) / F, Mem(n) / B) + Comm(n) / L_mesh            (`DeviceModel.time`)

A fused kernel K (a set of nodes compiled into one, as inductor fuses them) is charged

    FLOPs(K) =  sum_{n in K} FLOPs(n)
    Mem(K)   =  sum nbytes(v) over the values v read from outside K
                + sum nbytes(n) over n in K used outside K (or by nothing)   (`kernel_cost`)

its intermediates staying in registers.

the roofline time on a device with peak F FLOP/s and memory bandwidth B, plus
the in-stage collectives at the mesh link's bandwidth. Training multiplies
every term by about 3 (backward = 2 x forward); a constant factor does not move
the balanced cuts, so it is left out.

Balancing (`balance`): the compute nodes in graph order are grouped into units
u_0 .. u_{m-1} by the candidate cut positions; cutting between u_{j-1} and u_j
sends X_j bytes (every value defined before the cut and used after it). A
split into S stages picks cut indices 0 = j_0 < j_1 < ... < j_{S-1} < j_S = m;
stage k costs

    C_k = sum_{j_k <= i < j_{k+1}} Time(u_i)

The steady-state time per microbatch of a pipeline is its slowest stage, and
torch's schedules overlap the point-to-point transfers with compute, so the
split first minimizes the slowest stage,

    C* = min over splits of max_k C_k                                       (phase 1)

and then, among the splits within a slack e of it (every C_k <= (1 + e) C*),
the bytes crossing the cuts (ties: the smaller max_k C_k):

    min  sum_{k=1}^{S-1} X_{j_k}   subject to  max_k C_k <= (1 + e) C*       (phase 2)

Both are dynamic programs over (stages, units), O(S * m^2):

    f(s, j) = min_{i < j} max(f(s-1, i), P_j - P_i)                        (P = prefix sums of Time)
    g(s, j) = min_{i < j, P_j - P_i <= (1+e) C*} g(s-1, i) + X_j
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import sympy
import torch
import torch.fx as fx

from fxpar.core.spec import TensorSpec, get_info
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import dual_copies
from fxpar.ops.moe import moe_all_to_all_bytes, moe_experts

__all__ = ["DeviceModel", "NodeCost", "node_cost", "kernel_cost", "size_expr", "value_bytes", "example_sizes",
           "evaluate", "balance"]

aten = torch.ops.aten


@dataclass(frozen=True)
class DeviceModel:
    """A nominal accelerator: only ratios matter for where the cuts go.

    Attributes:
        flops: peak FLOP/s (F).
        mem_bandwidth: memory bytes/s (B).
        mesh_bandwidth: bytes/s of in-stage collectives (L_mesh, tensor-parallel links).
    """

    flops: float = 1e14
    mem_bandwidth: float = 2e12
    mesh_bandwidth: float = 2e11

    def time(self, cost: "NodeCost") -> sympy.Expr:
        """Time(n) in seconds, symbolic."""
        compute = sympy.Max(cost.flops / self.flops, cost.mem_bytes / self.mem_bandwidth)
        return compute + cost.comm_bytes / self.mesh_bandwidth

    def time_value(self, cost: "NodeCost", hints: dict) -> float:
        """Time(n) in seconds at the example sizes (no symbolic Max: it is the hot path of balancing)."""
        compute = max(evaluate(cost.flops, hints) / self.flops, evaluate(cost.mem_bytes, hints) / self.mem_bandwidth)
        return compute + evaluate(cost.comm_bytes, hints) / self.mesh_bandwidth


@dataclass(frozen=True)
class NodeCost:
    """FLOPs, memory traffic and collective payload of one node (sympy expressions)."""

    flops: sympy.Expr = sympy.Integer(0)
    mem_bytes: sympy.Expr = sympy.Integer(0)
    comm_bytes: sympy.Expr = sympy.Integer(0)

    def __add__(self, other: "NodeCost") -> "NodeCost":
        return NodeCost(self.flops + other.flops, self.mem_bytes + other.mem_bytes,
                        self.comm_bytes + other.comm_bytes)


def size_expr(s: Any) -> sympy.Expr:
    """A size (int or SymInt) as a sympy expression."""
    if isinstance(s, torch.SymInt):
        return s.node.expr
    return sympy.Integer(int(s))


def _local_shape(node: Any, index: int | None = None) -> tuple[sympy.Expr, ...] | None:
    """The local shape of a tensor node (or of output `index` of a multi-output node)."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    info = get_info(node)
    spec = info.spec if info is not None else None
    if index is not None:
        val = val[index] if isinstance(val, (tuple, list)) and index < len(val) else None
        spec = spec[index] if isinstance(spec, tuple) and index < len(spec) else None
    if not isinstance(val, torch.Tensor):
        return None
    shape = spec.local_shape if isinstance(spec, TensorSpec) else tuple(val.shape)
    return tuple(size_expr(s) for s in shape)


def _numel(shape: Sequence[sympy.Expr]) -> sympy.Expr:
    out = sympy.Integer(1)
    for s in shape:
        out = out * s
    return out


def _tensor_outputs(node: fx.Node) -> list[tuple[tuple[sympy.Expr, ...], torch.dtype]]:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [(_local_shape(node), val.dtype)]
    if isinstance(val, (tuple, list)):
        return [(_local_shape(node, i), v.dtype) for i, v in enumerate(val) if isinstance(v, torch.Tensor)]
    return []


def value_bytes(node: fx.Node) -> sympy.Expr:
    """Local bytes of a node's tensor value(s); 0 for non-tensors."""
    total = sympy.Integer(0)
    for shape, dtype in _tensor_outputs(node):
        total += _numel(shape) * dtype.itemsize
    return total


_MATMULS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.bmm.default, aten.matmul.default,
            aten.baddbmm.default}
_ATTENTION = {aten.scaled_dot_product_attention.default}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
    if hasattr(aten, _name):
        _ATTENTION.add(getattr(aten, _name).default)
_CONVS = {aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
VIEW_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim,
          aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.t.default, aten.alias.default,
          aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int,
          aten.detach.default, aten.as_strided.default, aten.contiguous.default, aten.sym_size.int,
          aten._assert_tensor_metadata.default, operator.getitem}
_ZERO_FLOP = VIEW_OPS | {aten.embedding.default} | set(COLLECTIVE_OPS)


def _matmul_flops(node: fx.Node) -> sympy.Expr:
    out = _tensor_outputs(node)[0][0]
    if node.target == aten.linear.default:
        k = _local_shape(node.args[0])[-1]
    elif node.target in (aten.addmm.default, aten.baddbmm.default):
        k = _local_shape(node.args[1])[-1]
    else:
        k = _local_shape(node.args[0])[-1]
    return 2 * _numel(out) * k


def _attention_flops(node: fx.Node) -> sympy.Expr:
    q, k, v = (_local_shape(a) for a in node.args[:3])
    return 2 * _numel(q[:-1]) * k[-2] * (q[-1] + v[-1])


def _conv_flops(node: fx.Node) -> sympy.Expr:
    out = _tensor_outputs(node)[0][0]
    w = _local_shape(node.args[1])
    return 2 * _numel(out) * _numel(w[1:])


def _moe_cost(node: fx.Node, mem: sympy.Expr) -> NodeCost:
    """A fused MoE node: its experts' matmuls on the routed slots, their rows, its ep exchange (docstring)."""
    x, idx, down = node.args[0], node.args[1], node.args[5]
    tokens, hidden = _local_shape(x)
    inter = _local_shape(down)[2]  # w_down: (E / ep, H, I / tp)
    slots = tokens * int(idx.meta["val"].shape[1])
    itemsize = x.meta["val"].dtype.itemsize
    ep = int(node.kwargs.get("ep_size", 1))
    comm = moe_all_to_all_bytes(slots, 1, hidden, itemsize, ep) if ep > 1 else sympy.Integer(0)
    return NodeCost(flops=2 * slots * 3 * hidden * inter, mem_bytes=mem + slots * (2 * hidden + 3 * inter) * itemsize,
                    comm_bytes=comm)


def node_cost(node: fx.Node) -> NodeCost:
    """FLOPs, memory bytes and collective bytes of one node, symbolically (see the module docstring)."""
    if node.op not in ("call_function", "call_module"):
        return NodeCost()
    outs = _tensor_outputs(node)
    if not outs:
        return NodeCost()
    target = node.target
    out_bytes = sum((_numel(s) * d.itemsize for s, d in outs), sympy.Integer(0))
    if target in COLLECTIVE_OPS:
        return NodeCost(comm_bytes=out_bytes * dual_copies(node))
    if target in VIEW_OPS:
        return NodeCost()
    in_bytes = sum((value_bytes(a) for a in node.all_input_nodes if a.op != "get_attr" or
                    isinstance(a.meta.get("val"), torch.Tensor)), sympy.Integer(0))
    mem = in_bytes + out_bytes
    if target is moe_experts:
        return _moe_cost(node, mem)
    if target in _MATMULS:
        flops = _matmul_flops(node)
    elif target in _ATTENTION:
        flops = _attention_flops(node)
    elif target in _CONVS:
        flops = _conv_flops(node)
    elif target in _ZERO_FLOP:
        flops = sympy.Integer(0)
    else:
        flops = sum((_numel(s) for s, _ in outs), sympy.Integer(0))
    return NodeCost(flops=flops, mem_bytes=mem)


def kernel_cost(nodes: Iterable[fx.Node]) -> NodeCost:
    """FLOPs and memory bytes of one fused kernel computing `nodes` (the module docstring's FLOPs(K), Mem(K))."""
    inside = set(nodes)
    flops = sum((node_cost(n).flops for n in inside), sympy.Integer(0))
    read = {a for n in inside for a in n.all_input_nodes if a not in inside}
    written = {n for n in inside if not n.users or any(u not in inside for u in n.users)}
    mem = sum((value_bytes(v) for v in read | written), sympy.Integer(0))
    return NodeCost(flops=flops, mem_bytes=mem)


def example_sizes(gm: fx.GraphModule) -> dict:
    """Symbol -> example value for every size symbol of the graph's inputs."""
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" and isinstance(val, torch.Tensor):
            for s in val.shape:
                if isinstance(s, torch.SymInt):
                    env = s.node.shape_env
                    return dict(getattr(env, "backed_var_to_val", None) or env.var_to_val)
    return {}


def evaluate(expr: Any, hints: dict) -> float:
    """The value of a cost expression at the example inputs (symbols -> example sizes)."""
    if isinstance(expr, (int, float)):
        return float(expr)
    return float(expr.xreplace(hints)) if expr.free_symbols else float(expr)


def balance(unit_costs: Sequence[float], cut_bytes: Sequence[float], num_stages: int, *,
            slack: float = 0.05, allowed: Iterable[int] | None = None) -> list[int]:
    """Cut indices j_1 < ... < j_{S-1}: the slowest stage first, then the bytes crossing (module docstring).

    Args:
        unit_costs: Time(u_i) of each unit.
        cut_bytes: X_j for j in 0..m (bytes crossing a cut before unit j; X_0 and X_m unused).
        num_stages: S.
        slack: e, how much slower than the best split a split with fewer bytes crossing may be.
        allowed: the cut indices that may be used (default: every 1..m-1).

    Returns:
        The S-1 chosen cut indices, ascending.

    Raises:
        ValueError: fewer allowed cuts than S - 1.
    """
    m = len(unit_costs)
    cuts = sorted(set(range(1, m)) if allowed is None else {j for j in allowed if 0 < j < m})
    if len(cuts) < num_stages - 1:
        raise ValueError(f"{len(cuts)} possible cuts for {num_stages} stages")
    prefix = [0.0]
    for c in unit_costs:
        prefix.append(prefix[-1] + c)
    starts = [0, *cuts]

    def stage_ends(s: int) -> list[int]:
        # Stage s (1-based) ends at a cut, the last one at m.
        return cuts if s < num_stages else [m]

    # Phase 1: f[j] = the best max stage cost of the first s stages covering units [0, j).
    f = {0: 0.0}
    for s in range(1, num_stages + 1):
        row = {}
        for j in stage_ends(s):
            options = [max(f[i], prefix[j] - prefix[i]) for i in starts if i < j and i in f]
            if options:
                row[j] = min(options)
        f = row
    best = f[m]
    cap = best * (1 + slack) + 1e-12 * max(best, 1.0)

    # Phase 2: g[j] = (bytes crossing so far, max stage cost so far, previous cut) under the cap.
    g: dict[int, tuple[float, float, int]] = {0: (0.0, 0.0, -1)}
    back: list[dict[int, int]] = []
    for s in range(1, num_stages + 1):
        row: dict[int, tuple[float, float, int]] = {}
        for j in stage_ends(s):
            for i in starts:
                if i >= j or i not in g or prefix[j] - prefix[i] > cap:
                    continue
                crossed = g[i][0] + (cut_bytes[j] if j < m else 0.0)
                worst = max(g[i][1], prefix[j] - prefix[i])
                cand = (crossed, worst, i)
                if j not in row or (cand[0], cand[1]) < (row[j][0], row[j][1]):
                    row[j] = cand
        back.append({j: v[2] for j, v in row.items()})
        g = row
    chosen, j = [], m
    for s in range(num_stages - 1, 0, -1):
        j = back[s][j]
        chosen.append(j)
    return sorted(chosen)
