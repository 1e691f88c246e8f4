"""verify(): is a ParallelModule numerically the original model, and if not, where does it go wrong?

Runs the original (a private deep copy, so the user's model is left alone)
and the parallel module on the same inputs and compares, by name:

    param <fqn>          every parameter and buffer, gathered, before anything runs
    output[i]            every output
    loss                 with target and loss_fn
    grad <fqn>           every parameter gradient, by original FQN
    grad input[i]        the gradient of every floating-point input
    param <fqn> (step)   with `optimizer`, every parameter after one step

Tolerances come from the dtype and the reduction fan-in. A parallel program
sums the same products in another order (local partial sums, then an
all-reduce), so it differs from the original by rounding, which grows with
the number F of terms in the largest reduction: a forward contraction (the
`in_features` of a linear, the reduced size of a sum) or a weight gradient's
sum over the batch. With u the dtype's unit roundoff:

    rtol = max(base_rtol(dtype), 8 u sqrt(F))        (default_tolerances)
    atol = max(base_atol(dtype), 8 u sqrt(F)) x max |reference|

`base` is 1e-10 relative for float64 (DESIGN.md's bar; a wrong collective is
off by O(1)) and torch.testing's defaults for lower precisions. The dtype is
the working precision: the least precise dtype any value of the graph is
computed in (`working_dtype`; a float64 model with a complex64 rotary table
computes at float32 precision in part), if that is below the tensor's own. `atol` is
scaled by the reference's largest magnitude so that tiny entries next to
large ones (cancellation) do not fail on rounding alone. `fan_in(gm)`
computes F from the rewritten graph.

`bisect=True` then looks for the first node of the rewritten graph whose
value differs from the same value in the original: the original is captured
again and both graphs run node by node; every node of the rewritten graph
whose name the original also has (collectives stand for the value they
redistribute) is gathered to its full value by its placements and compared.
If every forward value agrees but gradients do not, the same comparison runs
over gradients, from the outputs back. Every rank issues the same gathers in
the same order, so bisect runs on real and simulated process groups alike.
"""

from __future__ import annotations

import copy
import threading
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from fxpar._torch.dispatch import disable_current_modes
from fxpar._torch.fx import pytree, tree_flatten_spec
from fxpar.analysis.invariants import runtime_synced
from fxpar.capture import capture
from fxpar.core.errors import FxparError, _user_frame
from fxpar.core.spec import TensorSpec, get_info, placements_str, size_hint
from fxpar.ops.collectives import COLLECTIVE_OPS, _all_gather, _all_reduce
from fxpar.verify.report import BisectResult, TensorReport, VerifyReport, _compare, fan_in, working_dtype

__all__ = ["verify"]

_CAPTURE_LOCK = threading.Lock()

def _graph_modules(pm) -> list[fx.GraphModule]:
    stages = getattr(pm, "stage_modules", None)
    if stages:
        return [getattr(s, "graph_module", s) for s in stages]
    gm = getattr(pm, "graph_module", None)
    return [gm] if gm is not None else []


def _grad_inputs(inputs: tuple) -> tuple:
    """Copies of the inputs, floating-point tensors requiring grad."""
    return tuple(x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point()
                 else x for x in inputs)


def verify(model: nn.Module, pm: nn.Module, *inputs: Any, target: Any = None, loss_fn: Callable | None = None,
           rtol: float | None = None, atol: float | None = None, strict: bool = False,
           loss_reduction: str = "mean", optimizer: Callable | None = None, bisect: bool = False,
           **kwargs: Any) -> VerifyReport:
    """Runs `model` and `pm` on the same inputs and compares parameters, outputs, loss and gradients.

    Every rank must call it with the same arguments (it gathers sharded
    values with collectives).

    Args:
        model: the original model (not modified: a deep copy runs).
        pm: the ParallelModule from fxpar.parallelize.
        inputs: full inputs, the same on every rank.
        target, loss_fn: with both, one training step is compared: the loss,
            every parameter gradient by original FQN and every input gradient.
        rtol, atol: override the derived tolerances (atol relative to the
            reference's largest magnitude).
        strict: raise FxparError when anything differs.
        loss_reduction: passed to `pm.step`.
        optimizer: `params -> torch.optim.Optimizer`, e.g.
            `lambda ps: torch.optim.AdamW(ps, lr=1e-3)`: also take one step on
            both and compare every parameter after it (pm's parameters are
            restored afterwards).
        bisect: also find the first node of the rewritten graph whose value or
            gradient diverges (`report.bisect`).
        kwargs: keyword inputs for both models.

    Returns:
        A VerifyReport; `report.ok`, `report.worst`, `report.bisect`.

    Raises:
        FxparError: with `strict=True`, when anything differs.
    """
    ref = copy.deepcopy(model)
    gms = _graph_modules(pm)
    fan = max([fan_in(gm) for gm in gms] or [1])
    working = None
    for dt in (working_dtype(gm) for gm in gms):
        if dt is not None and (working is None or torch.finfo(dt).eps > torch.finfo(working).eps):
            working = dt
    reports: list[TensorReport] = []

    def compare(name: str, got: Any, want: Any) -> None:
        reports.append(_compare(name, got, want, rtol, atol, fan, working))

    full_fn = getattr(pm, "full_state_dict", None)
    if full_fn is not None:
        got_state = full_fn()
        for fqn, t in ref.state_dict(keep_vars=True).items():
            if fqn in got_state:
                compare(f"param {fqn}", got_state[fqn], t.detach())

    with torch.no_grad():
        want_out = ref(*inputs, **kwargs)
        got_out = pm(*inputs, **kwargs)
    got_leaves, want_leaves = pytree.tree_leaves(got_out), pytree.tree_leaves(want_out)
    if len(got_leaves) != len(want_leaves):
        reports.append(TensorReport("outputs", float("inf"), float("inf"), False,
                                    f"{len(got_leaves)} outputs != {len(want_leaves)}"))
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        compare(f"output[{i}]", g, w)

    if loss_fn is not None:
        ref.zero_grad(set_to_none=True)
        pm.zero_grad(set_to_none=True)
        ref_in, pm_in = _grad_inputs(inputs), _grad_inputs(inputs)
        want_loss = loss_fn(ref(*ref_in, **kwargs), target)
        want_loss.backward()
        got_loss = pm.step(*pm_in, target=target, loss_fn=loss_fn, loss_reduction=loss_reduction, **kwargs)
        compare("loss", got_loss, want_loss.detach())
        got_grads = pm.full_grads()
        for fqn, p in ref.named_parameters(remove_duplicate=False):
            if p.requires_grad:
                compare(f"grad {fqn}", got_grads.get(fqn), p.grad)
        for i, (a, b) in enumerate(zip(pm_in, ref_in)):
            if isinstance(b, torch.Tensor) and b.requires_grad:
                compare(f"grad input[{i}]", a.grad, b.grad)
        if optimizer is not None and full_fn is not None:
            saved = [p.detach().clone() for p in pm.parameters()]
            optimizer(list(ref.parameters())).step()
            optimizer(list(pm.parameters())).step()
            after = full_fn()
            with torch.no_grad():
                for p, s in zip(pm.parameters(), saved):
                    p.copy_(s)
            for fqn, p in ref.named_parameters(remove_duplicate=False):
                compare(f"param {fqn} (step)", after.get(fqn), p.detach())
        pm.zero_grad(set_to_none=True)

    found = None
    if bisect:
        found = _bisect(model, pm, inputs, kwargs, target, loss_fn, loss_reduction, rtol, atol, fan, working)
    report = VerifyReport(tuple(reports), found, fan)
    if strict and not report.ok:
        raise FxparError(str(report))
    return report


# --------------------------------------------------------------------------- bisect


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every node's value (retaining gradients when asked)."""

    def __init__(self, gm: fx.GraphModule, *, grads: bool) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.grads = grads
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            if self.grads and out.requires_grad and not out.is_leaf:
                out.retain_grad()
            self.values[n.name] = out
        return out

    def run_module(self, args: tuple, kwargs: dict) -> Any:
        in_spec, out_spec = getattr(self.module, "_in_spec", None), getattr(self.module, "_out_spec", None)
        if in_spec is None or out_spec is None:
            return self.run(*args, **kwargs)
        # As the exported module's own forward does: flatten (args, kwargs), unflatten the outputs.
        flat = tree_flatten_spec((list(args), dict(kwargs)), in_spec)
        out = self.run(*flat, enable_io_processing=False)
        return pytree.tree_unflatten(list(out), out_spec)


def _whole_outputs(gm: fx.GraphModule, mesh, out: Any) -> Any:
    """The graph's outputs gathered where it leaves them sharded (batch-sharded data parallel), differentiably.

    As the runtime's forward does; the gather's dual slices the gradient back, so
    a loss on the whole outputs backpropagates exactly as the original's.
    """
    node = next(n for n in gm.graph.nodes if n.op == "output")
    info = get_info(node)
    placements = list(info.input_placements) if info is not None and info.input_placements else []
    leaves, spec = pytree.tree_flatten(out)
    it = iter(placements)
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            continue
        places = next(it, None)
        for m in reversed(range(mesh.ndim)) if places is not None else ():
            p = places[m]
            if p is not None and not p.is_replicate() and not p.is_partial() and mesh.sizes[m] > 1:
                leaf = torch.ops.fxpar.all_gather(leaf, p.dim, mesh.sizes[m], mesh.group_name(m), mesh.names[m])
        leaves[i] = leaf
    return pytree.tree_unflatten(leaves, spec)


def _logical(node: fx.Node) -> fx.Node:
    """The value a node stands for: a collective redistributes its input's value."""
    while node.op == "call_function" and node.target in COLLECTIVE_OPS:
        node = node.args[0]
    return node


def _gather_full(local: torch.Tensor, placements, mesh, shape=None) -> list[torch.Tensor]:
    """Every replica's full value of a local tensor with `placements` (one per replica along R dims);
    `shape`: the global shape, for a dim split unevenly (torch.chunk's rows) by one mesh dim."""
    full = local.detach().contiguous()
    for m in reversed(range(mesh.ndim)):
        p = placements[m]
        n, group = mesh.sizes[m], mesh.group_name(m)
        if n == 1:
            continue
        if p.is_partial():
            full = _all_reduce(full, group)
        elif not p.is_replicate():
            alone = sum(q.is_shard() and q.dim == p.dim for q in placements) == 1
            size = size_hint(shape[p.dim]) if shape is not None and p.is_shard() and alone else None
            full = _all_gather(full, p.dim, n, group, getattr(p, "split_factor", 1),
                               full_size=size if size is not None and size % n else None)
    copies = [full]
    for m in range(mesh.ndim):
        if placements[m].is_replicate() and mesh.sizes[m] > 1:
            # Replicas must agree: compare every rank's copy, not only this one.
            gathered = _all_gather(torch.stack(copies), 0, mesh.sizes[m], mesh.group_name(m))
            copies = list(gathered.unbind(0))
    return copies


def _grad_placements(node: fx.Node, spec: TensorSpec, mesh) -> tuple | None:
    """How the gradient of a node's value lies on the mesh (None: a mixture no placement describes)."""
    from torch.distributed.tensor.placement_types import Partial, Replicate

    synced = runtime_synced(node)
    out = []
    for m, p in enumerate(spec.placements):
        if mesh.names[m] in synced:
            out.append(Replicate())  # the runtime all-reduced this parameter's gradient after the backward
        elif p.is_partial():
            out.append(Replicate())  # the gradient of a sum flows to every term whole
        elif not p.is_replicate():
            out.append(p)
        else:
            kinds = set()
            for u in node.users:
                info = get_info(u)
                if u.op == "output" or info is None:
                    kinds.add("R")
                    continue
                if u.op == "call_function" and u.target in COLLECTIVE_OPS:
                    kinds.add("R")  # grad_all_reduce and shard make their input's gradient whole
                    continue
                specs = info.spec if isinstance(info.spec, tuple) else (info.spec,)
                sharded = any(isinstance(s, TensorSpec) and not s.placements[m].is_replicate() for s in specs)
                kinds.add("P" if sharded else "R")
            if len(kinds) > 1:
                return None
            out.append(Partial() if kinds == {"P"} else Replicate())
    return tuple(out)


def _node_target(node: fx.Node) -> str:
    t = node.target
    if node.op != "call_function":
        return f"{node.op} {t}"
    s = str(t)
    if hasattr(t, "_schema"):  # an OpOverload prints as 'aten.mul.Tensor'
        return s.replace("torch.ops.", "", 1)
    return getattr(t, "__name__", s)


def _result(node: fx.Node, direction: str, placements, report: TensorReport, compared: int,
            spec: TensorSpec) -> BisectResult:
    info = get_info(node)
    ins = []
    for a in node.all_input_nodes:
        a_info = get_info(a)
        a_spec = a_info.spec if a_info is not None and isinstance(a_info.spec, TensorSpec) else None
        ins.append(f"%{a.name} {placements_str(a_spec.placements)}" if a_spec else f"%{a.name}")
    origin = info.origin if info is not None else None
    if node.op == "get_attr" and any(not p.is_replicate() for p in spec.placements):
        origin = "annotate_parameters (placements) / shard_parameters (local tensor)"
    return BisectResult(
        node=node.name, direction=direction, target=_node_target(node), placements=placements_str(placements),
        local_shape=tuple(size_hint(s) for s in spec.local_shape), shape=tuple(size_hint(s) for s in spec.shape),
        origin=origin, module=info.module_fqn if info is not None else "", source=_user_frame(node),
        max_abs=report.max_abs, max_rel=report.max_rel, inputs=tuple(ins),
        users=tuple(f"%{u.name} ({_node_target(u)})" for u in node.users
                    if not (u.op == "call_module" and str(u.target).startswith("_guards"))), compared=compared)


def _bisect(model: nn.Module, pm: nn.Module, inputs: tuple, kwargs: dict, target: Any, loss_fn: Callable | None,
            loss_reduction: str, rtol: float | None, atol: float | None, fan: int,
            working: torch.dtype | None) -> BisectResult:
    gms = _graph_modules(pm)
    if len(gms) != 1:
        raise FxparError("verify(bisect=True) does not support pipelined ParallelModules yet; bisect one stage's "
                         "module at a time")
    gm, mesh = gms[0], pm.mesh_info
    # torch.export keeps some tracing state per process, not per thread: one capture at a time, and
    # outside any dispatch mode of the caller (the simulator runs ranks as threads under one).
    with _CAPTURE_LOCK, disable_current_modes():
        ref_gm = capture(copy.deepcopy(model), tuple(inputs), dict(kwargs) or None)
    grads = loss_fn is not None
    with torch.enable_grad() if grads else torch.no_grad():
        ref_run, par_run = _Recorder(ref_gm, grads=grads), _Recorder(gm, grads=grads)
        ref_in, par_in = (_grad_inputs(inputs), _grad_inputs(inputs)) if grads else (inputs, inputs)
        ref_out = ref_run.run_module(ref_in, kwargs)
        par_out = _whole_outputs(gm, mesh, par_run.run_module(par_in, kwargs))
        if grads:
            loss_fn(ref_out, target).backward()
            loss_fn(par_out, target).backward()

    def tol_compare(name, copies, want) -> TensorReport:
        worst = None
        for c in copies:
            r = _compare(name, c, want, rtol, atol, fan, working)
            if worst is None or (not r.ok and worst.ok) or (r.ok == worst.ok and r.max_rel > worst.max_rel):
                worst = r
        return worst

    compared = 0
    first: BisectResult | None = None
    # Unused get_attr nodes keep no maintained spec (a tied weight's other name): skip them.
    nodes = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function") or n.op == "get_attr" and n.users]
    for node in nodes:
        info = get_info(node)
        spec = info.spec if info is not None else None
        if not isinstance(spec, TensorSpec) or node.name not in par_run.values:
            continue
        want = ref_run.values.get(_logical(node).name)
        if not isinstance(want, torch.Tensor):
            continue
        # Every rank gathers the same nodes in the same order (no early exit), so collectives match.
        rep = tol_compare(node.name, _gather_full(par_run.values[node.name], spec.placements, mesh, spec.shape), want)
        compared += 1
        if not rep.ok and first is None:
            first = _result(node, "forward", spec.placements, rep, 0, spec)
    if first is None and grads:
        for node in reversed(nodes):
            info = get_info(node)
            spec = info.spec if info is not None else None
            ref_val = ref_run.values.get(node.name)
            got_val = par_run.values.get(node.name)
            if not isinstance(spec, TensorSpec) or not isinstance(ref_val, torch.Tensor) or got_val is None:
                continue
            gp = _grad_placements(node, spec, mesh)
            if gp is None:
                continue
            have, want = got_val.grad, ref_val.grad
            if (have is None) != (want is None):
                # Decided the same way on every rank: whether a gradient reached the node is structural.
                if first is None:
                    rep = TensorReport(node.name, float("inf"), float("inf"), False, "gradient missing on one side")
                    first = _result(node, "backward", gp, rep, 0, spec)
                continue
            if have is None:
                continue
            rep = tol_compare(f"grad {node.name}", _gather_full(have, gp, mesh, spec.shape), want)
            compared += 1
            if not rep.ok and first is None:
                first = _result(node, "backward", gp, rep, 0, spec)
    if first is None:
        return BisectResult(None, compared=compared)
    return BisectResult(**{**first.__dict__, "compared": compared})
