"""Static invariants of fxpar graphs, checked after every pass and by `fxpar.check`.

Which checks run depends on what the passes so far provide:

    specs        every tensor value has a spec with one placement per mesh dim,
                 its global shape equal to meta["val"], its local shape equal to
                 the global shape divided by its shards; inputs and parameters
                 are never Partial
    collectives  every edge carries exactly the placements its consumer's
                 strategy needs (so no Partial reaches an op that is not linear
                 in it), graph outputs are Replicate, and every fxpar
                 collective has a registered backward dual
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.collectives import COLLECTIVE_OPS
from fxpar.errors import GraphInvariantError, node_context
from fxpar.mesh import MeshInfo
from fxpar.rules import tensor_args
from fxpar.spec import TensorSpec, get_info, make_spec, placements_str

__all__ = ["check_graph"]


def _same_shape(a, b) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b))


def _check_spec(node: fx.Node, spec: TensorSpec, val, mesh: MeshInfo) -> None:
    if len(spec.placements) != mesh.ndim:
        raise GraphInvariantError(f"{node_context(node)}: spec has {len(spec.placements)} placements "
                                  f"for a {mesh.ndim}-D mesh {mesh}")
    if not _same_shape(spec.shape, tuple(val.shape)):
        raise GraphInvariantError(f"{node_context(node)}: spec shape {spec.shape} != value shape {tuple(val.shape)}")
    want = make_spec(val, spec.placements, mesh.sizes)
    if not _same_shape(want.local_shape, spec.local_shape):
        raise GraphInvariantError(f"{node_context(node)}: local shape {spec.local_shape} does not match "
                                  f"{placements_str(spec.placements)} of {tuple(val.shape)} (expected {want.local_shape})")


def _check_specs(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if node.op not in ("placeholder", "get_attr", "call_function"):
            continue
        if node.op == "get_attr" and not node.users:
            continue
        info = get_info(node)
        if isinstance(val, torch.Tensor):
            if info is None or not isinstance(info.spec, TensorSpec):
                raise GraphInvariantError(f"{node_context(node)}: tensor value without a placement spec "
                                          "(a pass added it without meta['fxpar']; use fxpar.spec.set_info)")
            _check_spec(node, info.spec, val, mesh)
            if node.op in ("placeholder", "get_attr") and any(p.is_partial() for p in info.spec.placements):
                raise GraphInvariantError(f"{node_context(node)}: inputs and parameters cannot be Partial")
        elif isinstance(val, (tuple, list)) and info is not None and isinstance(info.spec, tuple):
            for v, s in zip(val, info.spec):
                if isinstance(v, torch.Tensor) and s is not None:
                    _check_spec(node, s, v, mesh)


def _check_edges(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    for node in gm.graph.nodes:
        info = get_info(node)
        if node.op == "call_function" and node.target in COLLECTIVE_OPS:
            if info is None or info.spec is None:
                raise GraphInvariantError(f"{node_context(node)}: collective without a spec")
            continue
        if info is None or info.input_placements is None:
            continue
        args = tensor_args(node)
        if len(args) != len(info.input_placements):
            raise GraphInvariantError(f"{node_context(node)}: {len(args)} tensor inputs but "
                                      f"{len(info.input_placements)} recorded input placements")
        for a, need in zip(args, info.input_placements):
            a_info = get_info(a)
            have = a_info.spec.placements if a_info and isinstance(a_info.spec, TensorSpec) else None
            if have is None or tuple(have) != tuple(need):
                raise GraphInvariantError(
                    f"{node_context(node)}: input %{a.name} is {placements_str(have) if have else 'unplaced'} "
                    f"but the op's strategy needs {placements_str(need)} (a missing or wrong collective)")


def check_graph(gm: fx.GraphModule, mesh: MeshInfo, provided: frozenset[str]) -> None:
    """Raises GraphInvariantError naming the first node that breaks an invariant."""
    if "specs" in provided:
        _check_specs(gm, mesh)
    if "collectives" in provided:
        _check_edges(gm, mesh)
