"""fxpar's error hierarchy.

Every error a user can see is an `FxparError`. Messages follow one shape: which
pass, which node (with the user's source line), what was expected and found,
and the fix. `node_context` formats the node part so every raiser says it the
same way.
"""

from __future__ import annotations

import torch.fx as fx

__all__ = [
    "FxparError",
    "PlanError",
    "CaptureError",
    "ShardingError",
    "GraphInvariantError",
    "ScheduleError",
    "CheckpointError",
    "node_context",
    "block_of",
]


class FxparError(Exception):
    """Base class of every error fxpar raises on purpose.

    Attributes:
        pass_name: the pass that was running, filled in by the pass manager.
    """

    def __init__(self, message: str, *, pass_name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.pass_name = pass_name

    def __str__(self) -> str:
        if self.pass_name and not self.message.startswith("["):
            return f"[{self.pass_name}] {self.message}"
        return self.message


class PlanError(FxparError, ValueError):
    """A plan or mesh that does not fit the model."""


class CaptureError(FxparError):
    """The model could not be captured as an fx graph."""


class ShardingError(FxparError):
    """A tensor cannot be sharded as asked (sizes, missing rules, layouts)."""


class GraphInvariantError(FxparError):
    """A rewritten graph breaks an fxpar invariant (found by `fxpar.check`)."""


class CheckpointError(FxparError):
    """A checkpoint that does not fit the model (missing, unexpected or mismatched FQNs), or cannot be found."""


class ScheduleError(FxparError):
    """A pipeline schedule or stage split that cannot run."""


def _user_frame(node: fx.Node) -> str | None:
    """The last frame of the user's source recorded for `node`, if any."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [line.strip() for line in trace.strip().splitlines() if line.strip().startswith("File ")]
    if not frames:
        return None
    # 'File "model.py", line 42, in forward' -> 'model.py:42'
    last = frames[-1]
    try:
        path = last.split('"')[1]
        lineno = last.split("line ")[1].split(",")[0]
        return f"{path.rsplit('/', 1)[-1]}:{lineno}"
    except IndexError:
        return last


def module_fqn_of(node: fx.Node) -> str:
    """The FQN of the innermost user module a node came from ('' for the root)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    return ""


def block_of(fqn: str) -> str | None:
    """The repeated block a module belongs to: 'model.layers.3' for 'model.layers.3.mlp.up', '0' for '0.up'
    (the module path up to its first numeric part); None outside any layer list."""
    parts = (fqn or "").split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def node_context(node: fx.Node) -> str:
    """'aten.view.default at %view_3 (model.py:42) in module layers.0.mlp'."""
    target = node.target
    what = getattr(target, "__name__", None) if not isinstance(target, str) else target
    if hasattr(target, "_schema"):
        what = str(target).replace("torch.ops.", "", 1) if str(target).startswith("torch.ops.") else str(target)
    parts = [f"{what} at %{node.name}" if node.op == "call_function" else f"{node.op} %{node.name}"]
    frame = _user_frame(node)
    if frame:
        parts.append(f"({frame})")
    # a node a pass inserted (a collective, an issue node) has no module stack: the module fxpar tagged it with
    fqn = module_fqn_of(node) or getattr(node.meta.get("fxpar"), "module_fqn", "") or ""
    parts.append(f"in module '{fqn}'" if fqn else "in the root module")
    return " ".join(parts)
