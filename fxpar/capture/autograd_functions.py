"""Refusing custom autograd.Functions, whose backward a capture would drop.

torch.export (non-strict, training IR) runs a custom `torch.autograd.Function`'s
forward and records the ATen ops it calls; its `backward` is not recorded.
fxpar trains with eager autograd through the captured graph, so the gradient
would be autograd's derivative of the forward, not the user's backward: a
silent wrong answer for straight-through estimators, gradient reversal or
clipping. The ops a Function's forward recorded are found by their stack
traces (file and line inside a user-defined Function's `forward`), and the
capture is refused naming the Function, the node and the module.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx

from fxpar.core.errors import CaptureError, module_fqn_of

__all__ = ["check_autograd_functions"]

_FRAME = re.compile(r'File "(.+?)", line (\d+), in (\w+)')


def _user_functions() -> dict[str, list[tuple[int, int, type]]]:
    """File -> (first line, last line, class) of the forward of every user-defined autograd.Function."""
    found: dict[str, list[tuple[int, int, type]]] = {}
    stack, seen = list(torch.autograd.Function.__subclasses__()), set()
    while stack:
        cls = stack.pop()
        if cls in seen:
            continue
        seen.add(cls)
        stack.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] == "torch":
            continue
        code = getattr(cls.__dict__.get("forward"), "__code__", None)
        if isinstance(cls.__dict__.get("forward"), staticmethod):
            code = getattr(cls.__dict__["forward"].__func__, "__code__", None)
        if code is None:
            continue
        lines = [ln for _, _, ln in code.co_lines() if ln is not None]
        found.setdefault(code.co_filename, []).append((code.co_firstlineno, max(lines or [code.co_firstlineno]), cls))
    return found


def check_autograd_functions(gm: fx.GraphModule) -> None:
    """Raises CaptureError if an op of `gm` was recorded inside a custom autograd.Function's forward."""
    functions = _user_functions()
    if not functions:
        return
    for node in gm.graph.nodes:
        trace = node.meta.get("stack_trace")
        if node.op != "call_function" or not trace:
            continue
        for filename, line, name in _FRAME.findall(trace):
            if name != "forward":
                continue
            for first, last, cls in functions.get(filename, ()):
                if first <= int(line) <= last:
                    fqn = module_fqn_of(node) or "<root>"
                    raise CaptureError(
                        f"[capture] {node.target} at %{node.name} ({filename}:{line}) in module '{fqn}' runs inside "
                        f"the custom autograd.Function {cls.__qualname__}: torch.export records its forward's ops "
                        f"and drops {cls.__qualname__}.backward, so fxpar's gradients would be autograd's "
                        "derivative of the forward instead. Write the forward with ops whose derivative is the "
                        "gradient you want (a straight-through estimator: x + (f(x) - x).detach()), or make it "
                        "a torch.library.custom_op with register_autograd (kept whole; it runs replicated)"
                    )
