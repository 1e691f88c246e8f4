"""State dicts of a ParallelModule keyed by the original FQNs, as DTensors DCP can reshard (torch's convention
for sharded modules), and the layouts behind them; `fxpar.checkpoint` saves and loads them.

Distributed checkpoints on torch.distributed.checkpoint (DCP): save, resume, reshard.

    fxpar.checkpoint.save(pm, "ckpt/step_100", optimizer=opt, extra={"step": 100})
    extra = fxpar.checkpoint.load(pm2, "ckpt/step_100", optimizer=opt2)   # any other mesh

A checkpoint is a DCP folder. Each rank writes only its own shards; the keys are
the original model's FQNs, so DCP reshards on load to any mesh (other world
size, other dims, other dim order, another pipeline split) and
`torch.distributed.checkpoint.format_utils.dcp_to_torch_save` turns the folder
into a plain `model.state_dict()`-shaped file. Keys:

    <fqn>                       a parameter or persistent buffer, under every FQN that names it
                                (a tied weight under each alias, as model.state_dict() has it)
    optim.state.<fqn>.<name>    optimizer state (exp_avg, exp_avg_sq, step, momentum_buffer, ...) under
                                the parameter's canonical FQN; tensors shaped like the parameter are
                                sharded like it and reshard with it
    optim.param_groups          the optimizer's hyperparameters per group (lr, betas, weight_decay, ...)
    extra                       the user's picklable state, as rank 0 has it

How a local shard becomes something DCP can reshard (`_layout`). DCP records,
per rank, one block of the global tensor (shape and offset), which it reads off
a DTensor's mesh and placements. fxpar's placements are DTensor's, but:

1. fxpar cuts a tensor mesh dim by mesh dim in `shard_order` (fsdp last, as
   FSDP2 + TP); DTensor cuts in mesh order. The DTensor therefore lives on the
   mesh with its dims in shard_order: the module's own mesh unless an fsdp dim
   comes before another dim, then a permuted copy of it (built once per module).
2. fxpar's `_StridedShard` (fused q/k/v: chunk r of each of k sections) is not
   one block of the full tensor. Such a tensor is gathered over its strided mesh
   dims (and any mesh dim that cuts the same tensor dim) and saved Replicate
   there: DCP writes one copy; other dims stay sharded. On load the rank's
   sections are cut from the loaded tensor.
3. Pipelines: placements refer to the mesh without pp; each rank writes its
   stages' tensors. A tied weight held by several stages is the same block on
   each of them, and DCP's planner writes it once (`dedup_save_plans`).

Every layout is checked: the block DCP computes from the DTensor must have the
local tensor's shape, or the tensor is gathered whole instead.

Atomic save: ranks write into `<path>.tmp-<n>`; once DCP has written the
metadata (after every rank's data), rank 0 renames the old checkpoint aside,
the new one into place, and deletes the old one. A rank killed during a save
leaves `<path>` as it was; `load` also recovers a checkpoint left aside or
complete but not yet renamed by a crash of rank 0 during those renames.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar._torch.placements import local_shape_and_offset as compute_local_shape_and_global_offset
from fxpar.core.dataflow import attr_of
from fxpar.core.errors import CheckpointError, block_of
from fxpar.core.replicas import repeat_blocks, unrepeat_blocks
from fxpar.core.spec import TensorSpec, chunk, get_spec, shard_order, size_hint
from fxpar.ops.collectives import _all_gather

__all__ = ["model_state_dict", "load_model_state_dict", "OPTIM_STATE", "OPTIM_GROUPS", "EXTRA"]

log = logging.getLogger(__name__)


OPTIM_STATE = "optim.state."
OPTIM_GROUPS = "optim.param_groups"
EXTRA = "extra"


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """How one local tensor is written to and read from DCP.

    Attributes:
        mesh: the DTensor's mesh (dims in shard_order), or None: a plain tensor (no mesh dims, a pp-only mesh).
        placements: placements on `mesh`, Replicate where the tensor is gathered before saving.
        shape: the global shape.
        gather: (module mesh dim, placement) gathered before saving, in gathering order (undo the last cut first).
        stored_as: the graph's shape of a parameter it stores in another shape than the model's
            (`unflatten_heads`: (H, D, C) for the model's (H*D, C)); gathered whole and saved in `shape`.
        repeats: (blocks, copies) of a stored_as tensor whose dim-0 blocks the graph holds several times
            (`replicate_kv_heads`: kv heads on several tp ranks); saved once each, repeated again on load.
    """

    mesh: DeviceMesh | None
    placements: tuple[Placement, ...]
    shape: tuple[int, ...]
    gather: tuple[tuple[int, Placement], ...] = ()
    stored_as: tuple[int, ...] | None = None
    repeats: tuple[int, int] | None = None


@dataclass
class _Tensor:
    """A parameter or persistent buffer of this rank.

    Attributes:
        fqns: every original FQN naming it, the canonical one (capture's) first.
        tensors: this rank's local tensor objects (more than one when several local pipeline stages
            hold copies of a tied weight); the first is the one saved.
        layout: how it maps onto DCP.
        is_param: a parameter (optimizer state may exist for it).
    """

    fqns: tuple[str, ...]
    tensors: list[torch.Tensor]
    layout: _Layout
    is_param: bool


def _pp_dims(pm) -> tuple[str, ...]:
    names = tuple(pm.mesh.mesh_dim_names or ("tp",))
    return tuple(n for n in names if n == "pp")


def _dcp_mesh(pm) -> tuple[DeviceMesh | None, list[int]]:
    """(the mesh DTensors live on, module mesh dim of each of its dims): pm's mesh without pp, dims in shard_order.

    Every rank builds the same meshes in the same order (a permuted mesh creates process groups: collective).
    """
    cached = pm.__dict__.get("_fxpar_dcp_mesh")
    if cached is not None:
        return cached
    info = pm.mesh_info
    order = shard_order(info.names)
    if pm.mesh is None:
        raise CheckpointError("this module has no process groups (a dry run); checkpoints need a real mesh")
    full_names = tuple(pm.mesh.mesh_dim_names or ("tp",))
    if not info.names:
        out: tuple = (None, [])
    elif order == list(range(info.ndim)):
        if full_names == info.names:
            mesh = pm.mesh
        else:
            mesh = pm.mesh[info.names if len(info.names) > 1 else info.names[0]]
        out = (mesh, order)
    else:
        # DTensor cuts in mesh order: a mesh whose dims are in fxpar's cut order (pp dims first, then sliced off).
        wanted = [*_pp_dims(pm), *(info.names[m] for m in order)]
        perm = [full_names.index(n) for n in wanted]
        permuted = DeviceMesh(pm.mesh.device_type, pm.mesh.mesh.permute(perm), mesh_dim_names=tuple(wanted))
        names = tuple(info.names[m] for m in order)
        out = (permuted[names if len(names) > 1 else names[0]], order)
    pm.__dict__["_fxpar_dcp_mesh"] = out
    return out


def _layout(pm, spec: TensorSpec | None, local: torch.Tensor, model_shape: tuple[int, ...] | None = None,
            repeats: tuple[int, int] | None = None) -> _Layout:
    """How `local`, laid out as `spec` on pm's mesh, maps onto a DTensor DCP can reshard (module docstring).

    `model_shape`: the model's shape of a tensor the graph stores otherwise (saved gathered, in that shape)."""
    mesh, order = _dcp_mesh(pm)
    shape = tuple(size_hint(s) for s in spec.shape) if spec is not None else tuple(local.shape)
    if model_shape is not None and tuple(model_shape) != shape:
        cut = [m for m in order if spec is not None and not spec.placements[m].is_replicate()]
        return _Layout(mesh, tuple(Replicate() for _ in order) if mesh is not None else (), tuple(model_shape),
                       tuple((m, spec.placements[m]) for m in reversed(cut)), stored_as=shape, repeats=repeats)
    if mesh is None:
        return _Layout(None, (), shape)
    if spec is None or all(p.is_replicate() for p in spec.placements):
        return _Layout(mesh, tuple(Replicate() for _ in order), shape)
    places = spec.placements
    strided = {p.dim for p in places if isinstance(p, _StridedShard)}
    cut = [m for m in order if not places[m].is_replicate()]
    gathered = [m for m in reversed(cut) if places[m].dim in strided]
    layout = _checked(pm, mesh, order, places, gathered, shape, local)
    if layout is None:  # not one block of the full tensor: write it whole (checked, never assumed)
        log.debug("checkpoint: a tensor of shape %s laid out %s is saved gathered", shape, places)
        layout = _checked(pm, mesh, order, places, list(reversed(cut)), shape, local)
        assert layout is not None
    return layout


def _checked(pm, mesh, order, places, gathered, shape, local) -> _Layout | None:
    """The layout saving `local` gathered over `gathered`, if DCP's block for it is the gathered tensor."""
    sizes = list(local.shape)
    for m in gathered:
        sizes[places[m].dim] *= pm.mesh_info.sizes[m]
    placements = []
    for m in order:
        p = places[m]
        if m in gathered or p.is_replicate():
            placements.append(Replicate())
        elif type(p) is Shard:
            placements.append(p)
        else:  # _StridedShard left, Partial: no single block
            return None
    block, _ = compute_local_shape_and_global_offset(shape, mesh, tuple(placements))
    if tuple(block) != tuple(sizes):
        return None
    return _Layout(mesh, tuple(placements), shape, tuple((m, places[m]) for m in gathered))


def _to_dcp(pm, value: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """The DTensor (or plain tensor) DCP saves for this rank's `value`; gathers where the layout says."""
    value = value.detach()
    for m, p in layout.gather:
        full = layout.stored_as[p.dim] if layout.stored_as is not None and p.is_shard() else None  # maybe uneven
        value = _all_gather(value, p.dim, pm.mesh_info.sizes[m], pm.mesh_info.group_name(m),
                            getattr(p, "split_factor", 1), full_size=full)
    if layout.stored_as is not None:
        if layout.repeats is not None:
            value = unrepeat_blocks(value, *layout.repeats)
        value = value.reshape(layout.shape)
    return _wrap(value, layout)


def _wrap(value: torch.Tensor, layout: _Layout) -> torch.Tensor:
    if layout.mesh is None:
        return value
    stride = torch.empty(layout.shape, device="meta").stride()
    return DTensor.from_local(value, layout.mesh, layout.placements, run_check=False,
                              shape=torch.Size(layout.shape), stride=stride)


def _target(pm, like: torch.Tensor, layout: _Layout, dtype: torch.dtype,
            into: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(what DCP loads into, the local buffer it fills) for a tensor laid out like `like`.

    `into` (a shard of the module) is filled in place when the layout gathers nothing and the dtypes agree.
    """
    if into is not None and not layout.gather and dtype == into.dtype:
        buf = into.detach()
    elif layout.stored_as is not None:  # gathered whole, in the model's shape
        buf = torch.empty(layout.shape, dtype=dtype, device=like.device)
    else:
        sizes = list(like.shape)
        for m, p in layout.gather:
            sizes[p.dim] *= pm.mesh_info.sizes[m]
        buf = torch.empty(sizes, dtype=dtype, device=like.device)
    return _wrap(buf, layout), buf


def _from_dcp(pm, buf: torch.Tensor, layout: _Layout) -> torch.Tensor:
    """This rank's shard of a loaded buffer: the gathered dims cut again, in fxpar's cut order."""
    info = pm.mesh_info
    if layout.stored_as is not None:
        if layout.repeats is not None:
            buf = repeat_blocks(buf, *layout.repeats)
        buf = buf.reshape(layout.stored_as)
    for m, p in reversed(layout.gather):
        n, c = info.sizes[m], info.coordinate[m]
        if isinstance(p, _StridedShard):
            buf = torch.cat([s.chunk(n, dim=p.dim)[c] for s in buf.chunk(p.split_factor, dim=p.dim)], dim=p.dim)
        else:
            buf = chunk(buf, n, p.dim, c)  # torch.chunk's rows, an empty one past the last chunk
    return buf


def _tensors(pm) -> list[_Tensor]:
    """This rank's parameters and persistent buffers, each once, with their FQNs and layouts."""
    aliases = {name: names for names in pm.capture_info.param_aliases.values() for name in names}
    reshaped = pm.capture_info.param_shapes
    repeated = pm.capture_info.param_repeats
    graphs = pm._stage_graphs()
    # A tensor's spec: from a get_attr node that uses it and whose local shape is the tensor's (a tied
    # weight's unused alias node can carry a stale one).
    specs: dict[int, tuple[int, TensorSpec]] = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            spec = get_spec(node)
            t = attr_of(gm, node.target)
            if spec is None or not isinstance(t, torch.Tensor):
                continue
            score = (tuple(size_hint(s) for s in spec.local_shape) == tuple(t.shape)) * 2 + bool(node.users)
            if score > specs.get(id(t), (-1, None))[0]:
                specs[id(t)] = (score, spec)
    by_fqn: dict[str, _Tensor] = {}
    by_id: dict[int, _Tensor] = {}
    for gm in graphs:
        persistent = set(gm.state_dict(keep_vars=True))
        named = [(n, t, True) for n, t in gm.named_parameters(remove_duplicate=False)]
        named += [(n, t, False) for n, t in gm.named_buffers(remove_duplicate=False) if n in persistent]
        for name, t, is_param in named:
            fqns = aliases.get(name, (name,))
            if id(t) in by_id:
                continue
            entry = by_fqn.get(fqns[0])
            if entry is not None:  # another local stage's copy of a tied weight
                entry.tensors.append(t)
                by_id[id(t)] = entry
                continue
            spec = specs.get(id(t), (0, None))[1]
            stored = next((reshaped[f] for f in (name, *fqns) if f in reshaped), None)
            repeats = next((repeated[f] for f in (name, *fqns) if f in repeated), None)
            entry = _Tensor(fqns, [t], _layout(pm, spec, t, stored, repeats), is_param)
            by_fqn[fqns[0]] = by_id[id(t)] = entry
    out = sorted(by_fqn.values(), key=lambda e: e.fqns[0])  # one order on every rank of a group
    return out


# --------------------------------------------------------------------------- state dicts


def model_state_dict(pm) -> dict[str, torch.Tensor]:
    """This rank's parameters and persistent buffers as DTensors keyed by the original FQNs.

    torch's convention for sharded modules (`torch.distributed.checkpoint.state_dict`): every FQN of
    the original model's `state_dict()` that this rank holds (a pipeline rank holds its stages'),
    each a DTensor whose global shape is the original's. Plain tensors on a pp-only mesh. Collective
    over the tensor-parallel group when a tensor has fused (strided) sections: those are gathered.
    """
    out: dict[str, torch.Tensor] = {}
    for e in _tensors(pm):
        value = _to_dcp(pm, e.tensors[0], e.layout)
        for fqn in e.fqns:
            out[fqn] = value
    return out


class _Keys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def load_model_state_dict(pm, state_dict: dict[str, Any], *, strict: bool = True) -> _Keys:
    """Copies a state dict into this rank's shards: DTensors on any mesh, or full plain tensors.

    Returns (missing_keys, unexpected_keys) as `nn.Module.load_state_dict` does. Collective when a
    value is a DTensor on a layout other than this module's (it is gathered with `full_tensor()`).

    Raises:
        CheckpointError: strict and keys are missing or unexpected, or a shape does not match.
    """
    entries = _tensors(pm)
    known = {fqn for e in entries for fqn in e.fqns}
    missing = sorted(f for e in entries for f in e.fqns if f not in state_dict)
    missing = [f for f in missing if not any(a in state_dict for e in entries if f in e.fqns for a in e.fqns)]
    unexpected = sorted(k for k in state_dict if k not in known)
    mismatched = {}
    for e in entries:
        key = next((f for f in e.fqns if f in state_dict), None)
        if key is not None and tuple(state_dict[key].shape) != e.layout.shape:
            mismatched[key] = (tuple(state_dict[key].shape), e.layout.shape)
    if strict and (missing or unexpected or mismatched):
        raise CheckpointError(_mismatch_message("the state dict", missing, unexpected, mismatched) +
                              "; strict=False loads the tensors that match")
    with torch.no_grad():
        for e in entries:
            key = next((f for f in e.fqns if f in state_dict and f not in mismatched), None)
            if key is None:
                continue
            value = state_dict[key]
            if isinstance(value, DTensor):
                if e.layout.mesh is not None and value.device_mesh == e.layout.mesh and \
                        tuple(value.placements) == e.layout.placements:
                    local = _from_dcp(pm, value.to_local(), e.layout)
                else:
                    value = value.full_tensor()
                    local = None
            else:
                local = None
            if local is None:
                local = _cut_full(pm, value, e)
            for t in e.tensors:
                t.copy_(local)
    return _Keys(missing, unexpected)


def _cut_full(pm, full: torch.Tensor, e: _Tensor) -> torch.Tensor:
    """This rank's shard of a full tensor (by the layout: the DTensor block, then the gathered dims)."""
    layout = e.layout
    if layout.mesh is not None:
        block, offset = compute_local_shape_and_global_offset(layout.shape, layout.mesh, layout.placements)
        for d, (n, o) in enumerate(zip(block, offset)):
            full = full.narrow(d, o, n)
    return _from_dcp(pm, full, layout)


# --------------------------------------------------------------------------- save


def _optimizer_state(pm, optimizer, entries: list[_Tensor]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for e in entries:
        state = optimizer.state.get(e.tensors[0]) if e.is_param else None
        if not state:
            continue
        p = e.tensors[0]
        for name, v in state.items():
            key = f"{OPTIM_STATE}{e.fqns[0]}.{name}"
            if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape == p.shape:
                out[key] = _to_dcp(pm, v, e.layout)  # sharded like its parameter
            elif isinstance(v, torch.Tensor):
                out[key] = v.detach().clone()  # step: the same on every rank holding the parameter
            else:
                out[key] = v
    out[OPTIM_GROUPS] = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return out


def _mismatch_message(what: str, missing: list[str], unexpected: list[str], mismatched: dict) -> str:
    def names(keys: list[str]) -> str:
        shown = ", ".join(keys[:12])
        return shown + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")

    def modules(keys: list[str]) -> str:
        # the blocks (layers) first: 'transformer.h.2', not each of its twelve tensors
        mods = sorted({block_of(k) or k.rpartition(".")[0] or k for k in keys})
        return f" (in {', '.join(mods[:8])}{', ...' if len(mods) > 8 else ''})"

    parts = []
    if missing:
        parts.append(f"missing (in the model, not in {what}): {names(missing)}{modules(missing)}")
    if unexpected:
        parts.append(f"unexpected (in {what}, not in the model): {names(unexpected)}{modules(unexpected)}")
    if mismatched:
        parts.append("shape mismatch: " + ", ".join(f"{k} {tuple(a)} in {what} vs {tuple(b)} in the model"
                                                     for k, (a, b) in sorted(mismatched.items())))
    return f"{what} does not match the model: " + "; ".join(parts)
