"""Capture: a user's nn.Module as an ATen-level fx GraphModule.

The one IR of fxpar is what `torch.export.export(..., strict=False)` produces
in training IR, unlifted with `ep.module()`: high-level ops kept (linear,
layer_norm, scaled_dot_product_attention, embedding), parameters as
`get_attr` nodes under their original FQNs, `node.meta["val"]` holding
FakeTensors and `node.meta["nn_module_stack"]` naming each node's module.

Input dims are captured as `Dim.AUTO` so one capture serves any batch and
sequence length export could keep symbolic (it specialises the rest and says
so in the graph's guards).

A Hugging Face model with `config.use_cache=True` returns a `DynamicCache`,
which export cannot return: when the forward takes `use_cache` and the caller
did not pass it, capture binds `use_cache=False` (a training graph has no use
for a KV cache) and records a note that `explain()` shows and the log warns of.

The captured module gets fresh copies of every parameter and buffer: the
user's model is never modified, not by sharding and not by optimizer steps.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.export import Dim

from fxpar._torch.fx import pytree
from fxpar.capture.autograd_functions import check_autograd_functions
from fxpar.core.errors import CaptureError

__all__ = ["CaptureInfo", "capture", "capture_info", "LOSS_TARGET"]

LOSS_TARGET = "fxpar_target"
"""The keyword a captured loss's target enters the graph by (a placeholder of that name)."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptureInfo:
    """Graph-level facts from capture, kept in `gm.meta["fxpar"]`.

    Attributes:
        param_aliases: canonical parameter FQN -> every FQN of the original
            model that names the same tensor (tied weights).
        buffer_fqns: FQNs of buffers.
        model_class: the captured model's class name.
        dynamic: whether input dims were captured symbolically.
        notes: what capture changed about the model's call, for the user (explain() lists them).
        training: the mode (`model.training`) the model was captured in.
        loss: whether the graph is the model followed by its loss (`capture(..., loss_fn=)`): it
            takes the target as the keyword `fxpar_target` and returns the scalar loss.
        param_shapes: parameters a pass stores in another shape (`unflatten_heads`: (H*D, C) as
            (H, D, C)), FQN -> the model's own shape; full state dicts and gradients use it.
        param_repeats: parameters stored with blocks of dim 0 repeated (`replicate_kv_heads`: kv heads
            held by several tp ranks), FQN -> (blocks, copies) for `fxpar.core.replicas.unrepeat_blocks`.
    """

    param_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    buffer_fqns: tuple[str, ...] = ()
    model_class: str = ""
    dynamic: bool = True
    notes: tuple[str, ...] = ()
    training: bool = True
    loss: bool = False
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    param_repeats: dict[str, tuple[int, int]] = field(default_factory=dict)


def capture_info(gm: fx.GraphModule) -> CaptureInfo:
    info = gm.meta.get("fxpar")
    if not isinstance(info, CaptureInfo):
        raise CaptureError("this GraphModule was not captured by fxpar.capture; call fxpar.capture(model, args) first")
    return info


def _auto_dims(args: tuple, kwargs: dict) -> tuple[Any, Any]:
    def dims(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return {i: Dim.AUTO for i in range(x.ndim)} if x.ndim else None
        return None

    return pytree.tree_map(dims, args), pytree.tree_map(dims, kwargs)


def _failing_module(model: nn.Module, tb) -> tuple[str | None, str | None]:
    """The innermost frame of the user's model in a traceback, as (module FQN, 'file:line')."""
    names = {id(m): fqn for fqn, m in model.named_modules()}
    found: tuple[str | None, str | None] = (None, None)
    for frame, lineno in traceback.walk_tb(tb):
        self_obj = frame.f_locals.get("self")
        if self_obj is not None and id(self_obj) in names:
            found = (names[id(self_obj)] or "<root>", f"{frame.f_code.co_filename}:{lineno}")
    return found


def _without_cache(model: nn.Module, kwargs: dict) -> tuple[nn.Module, tuple[str, ...]]:
    """`model` called with use_cache=False when its forward would return a KV cache export can't return.

    The user's model is not touched: a shallow copy (sharing submodules, parameters and
    buffers, so FQNs are unchanged) gets its own bound forward.
    """
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return model, ()
    config = getattr(model, "config", None)
    if "use_cache" not in params or "use_cache" in kwargs or not getattr(config, "use_cache", False):
        return model, ()
    bound = copy.copy(model)
    bound.forward = functools.partial(type(model).forward, bound, use_cache=False)
    note = (f"{type(model).__name__} was captured with use_cache=False (its config has use_cache=True, and a "
            "DynamicCache output cannot be captured); outputs carry no past_key_values")
    log.warning("fxpar.capture: %s", note)
    return bound, (note,)


def _with_loss(model: nn.Module, loss_fn: Any) -> nn.Module:
    """`model` followed by `loss_fn(output, target)`, the target passed as the keyword `fxpar_target`.

    As `_without_cache`: a shallow copy (sharing submodules, parameters and buffers, so FQNs are
    unchanged) gets its own forward; the user's model is not touched.
    """
    inner = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        target = kwargs.pop(LOSS_TARGET)
        return loss_fn(inner(*args, **kwargs), target)

    try:
        sig = inspect.signature(inner)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        params.append(inspect.Parameter(LOSS_TARGET, inspect.Parameter.KEYWORD_ONLY))
        params += [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
        forward.__signature__ = sig.replace(parameters=params)  # export names dynamic dims by it
    except (TypeError, ValueError):
        pass
    bound = copy.copy(model)
    bound.forward = forward
    return bound


def _copy_state(gm: fx.GraphModule) -> dict[str, tuple[str, ...]]:
    """Gives gm its own copy of every parameter and buffer; returns tied aliases."""
    aliases: dict[int, list[str]] = {}
    for fqn, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(fqn)
    copies: dict[int, nn.Parameter] = {}
    for fqn, p in list(gm.named_parameters(remove_duplicate=False)):
        if id(p) not in copies:
            copies[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        mod_name, _, name = fqn.rpartition(".")
        setattr(gm.get_submodule(mod_name), name, copies[id(p)])
    for fqn, b in list(gm.named_buffers(remove_duplicate=False)):
        mod_name, _, name = fqn.rpartition(".")
        gm.get_submodule(mod_name).register_buffer(name, b.detach().clone())
    return {names[0]: tuple(names) for names in aliases.values()}


def _check_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """The example inputs must bind to the model's forward: a missing one is named before torch.export runs."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a builtin or C forward: torch.export will say
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        needed = [n for n, p in sig.parameters.items() if p.default is inspect.Parameter.empty
                  and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        raise CaptureError(
            f"the example inputs do not fit {type(model).__name__}.forward{sig}: {e}; pass "
            f"example_inputs=(...) (and example_kwargs=...) as the model is called"
            + (f", e.g. example_inputs=({', '.join(needed)},)" if needed and not args else "")) from None


def capture(
    model: nn.Module,
    args: tuple = (),
    kwargs: dict | None = None,
    *,
    dynamic: bool = True,
    loss_fn: Any = None,
    target: Any = None,
) -> fx.GraphModule:
    """Captures `model` as an ATen-level GraphModule with FakeTensor metadata.

    Args:
        model: any nn.Module, including a GraphModule from symbolic_trace.
        args: example positional inputs.
        kwargs: example keyword inputs.
        dynamic: capture every input dim as Dim.AUTO (symbolic where possible).
        loss_fn: capture `loss_fn(model(*args, **kwargs), target)` instead of the model alone: the
            graph takes the target as the keyword `fxpar_target` and returns the loss.
        target: the example target (with `loss_fn`).

    Returns:
        The unlifted GraphModule with its own copies of the parameters, and
        a `CaptureInfo` in `gm.meta["fxpar"]`.

    Raises:
        CaptureError: naming the module and source line that failed, and what to try.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(args, tuple):
        args = (args,)
    _check_inputs(model, args, kwargs)
    user_model = model
    model, notes = _without_cache(model, kwargs)
    if loss_fn is not None:
        if target is None:
            raise CaptureError("a captured loss needs an example target: pass example_target= with loss_fn=")
        model = _with_loss(model, loss_fn)
        kwargs[LOSS_TARGET] = target
    dynamic_shapes = None
    if dynamic:
        args_dims, kwargs_dims = _auto_dims(args, kwargs)
        dynamic_shapes = _combine(model, args_dims, kwargs_dims) if kwargs else args_dims
    try:
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:  # torch.export raises many types; we name the place and re-raise as one
        fqn, where = _failing_module(user_model, sys.exc_info()[2])
        place = f" in module '{fqn}' ({where})" if fqn else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{place}: {type(e).__name__}: {first}. "
            "Try: make control flow that depends on tensor values static (or use torch.cond); "
            "pass example inputs with the shapes and dtypes the model is used with; "
            "fxpar captures dim 0 of every input as a symbolic (dynamic) size, which data-parallel shards and "
            "microbatches need, so code that branches on the batch size fails here: remove such branches; "
            "see torch.export's docs for the op named above."
        ) from e
    gm = ep.module()
    check_autograd_functions(gm)
    aliases = _copy_state(gm)
    buffers = tuple(fqn for fqn, _ in gm.named_buffers())
    gm.meta["fxpar"] = CaptureInfo(aliases, buffers, type(user_model).__name__, dynamic, notes,
                                   bool(user_model.training), loss_fn is not None)
    log.debug("captured %s: %d nodes", type(user_model).__name__, len(gm.graph.nodes))
    return gm


def _combine(model: nn.Module, args_dims: tuple, kwargs_dims: dict) -> dict:
    """Dynamic shapes keyed by forward's parameter names (needed when kwargs are given)."""
    sig = inspect.signature(model.forward)
    names = [p for p in sig.parameters if p != "self"]
    out = dict(zip(names, args_dims))
    out.update(kwargs_dims)
    return out
