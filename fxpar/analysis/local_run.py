"""The local-shape check: run a graph on FakeTensors of each value's local shape and compare with its specs."""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from fxpar._torch.dispatch import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode
from fxpar.core.errors import GraphInvariantError, node_context
from fxpar.core.spec import TensorSpec, get_info, placements_str, size_hint

log = logging.getLogger(__name__)


def _hint_shape(shape) -> tuple[int, ...]:
    return tuple(size_hint(s) for s in shape)


def _specs_of(info) -> tuple[TensorSpec | None, ...]:
    spec = info.spec if info is not None else None
    if isinstance(spec, TensorSpec):
        return (spec,)
    if isinstance(spec, tuple):
        return spec
    return ()


class _LocalRun(fx.Interpreter):
    """Runs a graph on FakeTensors of local shapes and checks each node against its spec."""

    def __init__(self, gm: fx.GraphModule, mode) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.mode = mode

    def _fake(self, node: fx.Node, fallback: torch.Tensor | None = None):
        # Called inside the FakeTensorMode: torch.empty makes a FakeTensor.
        spec = get_info(node).spec if get_info(node) is not None else None
        if isinstance(spec, TensorSpec):
            return torch.empty(_hint_shape(spec.local_shape), dtype=spec.dtype)
        if fallback is not None:
            return torch.empty(_hint_shape(fallback.shape), dtype=fallback.dtype)
        return None

    def placeholder(self, target, args, kwargs):
        node = self._node
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            return self._fake(node, val)
        if isinstance(val, torch.SymInt):
            return size_hint(val)
        return val

    def get_attr(self, target, args, kwargs):
        real = super().get_attr(target, args, kwargs)
        if isinstance(real, torch.Tensor):
            return self._fake(self._node, real)
        return real

    def call_module(self, target, args, kwargs):
        if str(target).startswith("_guards"):
            return None  # the capture's input-shape guard: checks global example shapes, not ours
        return super().call_module(target, args, kwargs)

    def run_node(self, n: fx.Node):
        self._node = n
        try:
            out = super().run_node(n)
        except GraphInvariantError:
            raise
        except Exception as e:  # noqa: BLE001 - classified below

            if isinstance(e, (DataDependentOutputException, DynamicOutputShapeException, NotImplementedError)):
                raise _Unsupported(n) from e
            ins = ", ".join(_describe_local(a) for a in n.all_input_nodes)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise GraphInvariantError(
                f"{node_context(n)}: does not run on this rank's local shapes: {type(e).__name__}: {first}. "
                f"Inputs: {ins}. A shape argument still holds a global size (localize it in the op's rule) "
                "or a placement does not match the tensor") from None
        if n.op in ("call_function", "call_module") and get_info(n) is not None:
            vals = out if isinstance(out, (tuple, list)) else (out,)
            for v, spec in zip(vals, _specs_of(get_info(n))):
                if isinstance(v, torch.Tensor) and spec is not None:
                    want = _hint_shape(spec.local_shape)
                    if tuple(v.shape) != want:
                        raise GraphInvariantError(
                            f"{node_context(n)}: computes local shape {list(v.shape)} on this rank but its spec "
                            f"{placements_str(spec.placements)} of global {list(_hint_shape(spec.shape))} says "
                            f"{list(want)}: local and global shapes disagree (a shape argument or collective "
                            "argument that was not localized, or a wrong placement)")
        return out


class _Unsupported(Exception):
    def __init__(self, node: fx.Node) -> None:
        super().__init__(node.name)
        self.node = node


def _describe_local(a: fx.Node) -> str:
    info = get_info(a)
    spec = info.spec if info is not None else None
    if isinstance(spec, TensorSpec):
        return f"%{a.name} {placements_str(spec.placements)} local {list(_hint_shape(spec.local_shape))}"
    return f"%{a.name}"


def local_fake_run(gm: fx.GraphModule) -> bool:
    """Runs `gm` on FakeTensors of local shapes (no data, no communication) and checks every node.

    Returns:
        True if the whole graph ran; False if an op cannot run on FakeTensors
        (data-dependent shapes): the check is then partial.

    Raises:
        GraphInvariantError: naming the first node that fails on local shapes or
            produces a local shape its spec does not say.
    """

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode, torch.no_grad():
        runner = _LocalRun(gm, mode)
        try:
            runner.run(*[None for _ in placeholders], enable_io_processing=False)
        except _Unsupported as e:
            log.debug("local-shape check stopped at %s (not runnable on fake tensors)", e.node.name)
            return False
    return True
