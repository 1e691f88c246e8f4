"""Models larger than one rank: a meta-device model compiled into real local shards, one rank at a time.

    model (parameters on meta)
      -> meta_skeleton(model)                 the structure, every parameter on meta; the ParallelModule keeps
                                              it (pm.init_weights and fxpar.checkpoint run the model's own code
                                              and read its config on it), never a value
      -> fake_copy(skeleton, device)          the same structure with FakeTensors on the mesh's device: captured
                                              like a real model, so device constants in the graph (arange,
                                              to(device=...)) name the real device, and no byte is allocated
      -> capture -> passes                    shard_parameters cuts the FakeTensors to local shapes
      -> allocate_local(gm, device)           each FakeTensor (or meta) parameter and buffer of this rank's graph
                                              module becomes zeros of its local shape on the device
      -> fxpar.runtime.init_weights.compute_buffers: buffers the model computes (rotary inv_freq) from its own code

No full parameter is ever allocated here: a rank holds its local shards and
nothing else. Values come from `pm.init_weights()` (`fxpar.runtime.init_weights`)
or `fxpar.checkpoint.load_hf`, which write each shard in place (the FSDP
buckets and gradient hooks hold the shard tensors, so their storage must stay).

`LocalTensor` / `local_tensors` are the one mapping those writers share: each
original FQN (tied names included) to this rank's tensor, its placements and
the slice of the full tensor it holds (`local_slices`, the inverse of
`fxpar.passes.shard_parameters.local_chunk`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.distributed.tensor.placement_types import Replicate

from fxpar._torch.dispatch import FakeTensor, FakeTensorMode
from fxpar.core.mesh import MeshInfo
from fxpar.core.replicas import repeat_blocks
from fxpar.core.spec import TensorSpec, get_spec
from fxpar.passes.shard_parameters import local_chunk

__all__ = [
    "has_meta",
    "meta_skeleton",
    "fake_copy",
    "allocate_local",
    "mesh_device",
    "LocalTensor",
    "local_tensors",
    "local_slices",
    "write_full",
    "to_stored",
]

_REPLICATE = Replicate()


def has_meta(model: nn.Module) -> bool:
    """Whether any parameter or buffer of `model` lives on the meta device."""
    return any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def _is_placeholder(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor) or t.device.type == "meta"


def meta_skeleton(model: nn.Module, *, buffers: bool = False) -> nn.Module:
    """A copy of `model` whose parameters (and buffers, if `buffers`) are on meta; real buffers are copied.

    Tied parameters stay one object (deepcopy's memo), `requires_grad` is kept. Costs no
    parameter memory whatever device `model` is on.
    """
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        if buffers or b.device.type == "meta":
            memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(model, memo)


def fake_copy(skeleton: nn.Module, device: torch.device) -> nn.Module:
    """`skeleton` with each meta parameter and buffer replaced by a FakeTensor on `device` (for capture)."""
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, Any] = {}
    for t in [*skeleton.parameters(), *skeleton.buffers()]:
        if t.device.type != "meta" or id(t) in memo:
            continue
        with mode:
            fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        memo[id(t)] = nn.Parameter(fake, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else fake
    return copy.deepcopy(skeleton, memo)


def mesh_device(mesh: Any) -> torch.device:
    """The device this rank's tensors live on: the mesh's device type (the current CUDA device for cuda)."""
    kind = getattr(mesh, "device_type", "cpu")
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def allocate_local(gm: fx.GraphModule, device: torch.device) -> list[str]:
    """Replaces every FakeTensor / meta parameter and buffer of `gm` by zeros of the same (local) shape.

    Tied names keep sharing one tensor; buffers keep their persistence (nn.Module's
    setattr on a registered buffer name). Returns the FQNs allocated.
    """
    modules = dict(gm.named_modules(remove_duplicate=False))
    new: dict[int, torch.Tensor] = {}
    done = []
    for fqn, t in [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]:
        if not _is_placeholder(t):
            continue
        real = new.get(id(t))
        if real is None:
            zeros = torch.zeros(tuple(t.shape), dtype=t.dtype, device=device)
            real = nn.Parameter(zeros, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else zeros
            new[id(t)] = real
        mod_name, _, attr = fqn.rpartition(".")
        setattr(modules[mod_name], attr, real)
        done.append(fqn)
    # Tensor constants of the graph (get_attr of a plain attribute) cannot be made up: none may be fake.
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            mod_name, _, attr = str(node.target).rpartition(".")
            value = getattr(modules.get(mod_name), attr, None)
            if isinstance(value, torch.Tensor) and _is_placeholder(value):
                raise RuntimeError(f"graph constant {node.target} of a meta-device model has no value")
    return done


# --------------------------------------------------------------------------- this rank's tensors by FQN


@dataclass(frozen=True, eq=False)
class LocalTensor:
    """One parameter or buffer as this rank holds it.

    Attributes:
        fqns: every FQN of the original model naming this tensor (tied names), canonical first.
        local: this rank's tensor (written in place).
        spec: its placements and shapes (None: replicated, the whole tensor).
        is_param: a parameter (else a buffer).
        stored_as: for a parameter the graph stores in another shape than the model's
            (`unflatten_heads`: (H*D, C) as (H, D, C)), the model's own shape; else None.
    """

    fqns: tuple[str, ...]
    local: torch.Tensor
    spec: TensorSpec | None
    is_param: bool
    stored_as: tuple[int, ...] | None = None
    repeats: tuple[int, int] | None = None  # (blocks, copies): kv heads held by several ranks (replicate_kv_heads)

    @property
    def model_shape(self) -> tuple[int, ...]:
        """The shape the model (and its checkpoints) give this tensor."""
        return self.stored_as if self.stored_as is not None else self.full_shape

    @property
    def full_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.spec.shape) if self.spec is not None else tuple(self.local.shape)

    @property
    def replicated(self) -> bool:
        return self.spec is None or all(p.is_replicate() for p in self.spec.placements)


def _specs(gm: fx.GraphModule) -> dict[int, TensorSpec]:
    out = {}
    modules = dict(gm.named_modules(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            spec = get_spec(node)
            mod_name, _, attr = str(node.target).rpartition(".")
            t = getattr(modules.get(mod_name), attr, None)
            if spec is not None and isinstance(t, torch.Tensor):
                out[id(t)] = spec
    return out


def local_tensors(gm: fx.GraphModule) -> dict[str, LocalTensor]:
    """Every parameter and buffer of this rank's graph module by original FQN (each tied name included)."""
    specs = _specs(gm)
    groups: dict[int, list[str]] = {}
    tensors: dict[int, tuple[torch.Tensor, bool]] = {}
    for is_param, items in ((True, gm.named_parameters(remove_duplicate=False)),
                            (False, gm.named_buffers(remove_duplicate=False))):
        for fqn, t in items:
            groups.setdefault(id(t), []).append(fqn)
            tensors[id(t)] = (t, is_param)
    reshaped = getattr(gm.meta.get("fxpar"), "param_shapes", None) or {}
    repeated = getattr(gm.meta.get("fxpar"), "param_repeats", None) or {}
    out = {}
    for key, fqns in groups.items():
        t, is_param = tensors[key]
        stored_as = next((tuple(reshaped[f]) for f in fqns if f in reshaped), None)
        repeats = next((tuple(repeated[f]) for f in fqns if f in repeated), None)
        entry = LocalTensor(tuple(fqns), t, specs.get(key), is_param, stored_as, repeats)
        for fqn in fqns:
            out[fqn] = entry
    return out


def _dim_indices(size: int, dim: int, spec: TensorSpec, mesh: MeshInfo) -> torch.Tensor:
    """The indices along `dim` of the full tensor this rank holds, in local order (local_chunk on an arange)."""
    idx = torch.arange(size)
    placements = []
    for p in spec.placements:
        on_dim = not p.is_replicate() and getattr(p, "dim", None) == dim
        placements.append(type(p)(0, **({"split_factor": p.split_factor} if hasattr(p, "split_factor") else {}))
                          if on_dim else _REPLICATE)
    return local_chunk(idx, placements, mesh.sizes, mesh.coordinate, mesh.names)


def local_slices(entry: LocalTensor, mesh: MeshInfo) -> list[list[tuple[int, int]]]:
    """Per dim, the [start, stop) ranges of the full tensor this rank holds, in local order.

    A plain Shard gives one range per dim; a strided shard (fused sections) one per section.
    """
    out = []
    for d, size in enumerate(entry.full_shape):
        if entry.replicated:
            out.append([(0, size)])
            continue
        idx = _dim_indices(size, d, entry.spec, mesh).tolist()
        ranges: list[tuple[int, int]] = []
        for i in idx:
            if ranges and ranges[-1][1] == i:
                ranges[-1] = (ranges[-1][0], i + 1)
            else:
                ranges.append((i, i + 1))
        out.append(ranges)
    return out


def to_stored(full: torch.Tensor, entry: LocalTensor) -> torch.Tensor:
    """A full tensor in the model's shape as the graph stores it (kv heads repeated, heads unflattened)."""
    if entry.repeats is not None:
        full = repeat_blocks(full, *entry.repeats)
    return full.reshape(entry.full_shape)


def write_full(entry: LocalTensor, full: torch.Tensor, mesh: MeshInfo) -> None:
    """Writes this rank's slice of the full tensor `full` (in the model's shape) into the entry's local tensor."""
    if entry.stored_as is not None and tuple(full.shape) == entry.stored_as:
        full = to_stored(full, entry)
    if tuple(full.shape) != entry.full_shape:
        raise ValueError(f"{entry.fqns[0]}: got a tensor of shape {tuple(full.shape)}, the model's is "
                         f"{entry.full_shape}")
    part = full if entry.replicated else local_chunk(full, entry.spec.placements, mesh.sizes, mesh.coordinate,
                                                     mesh.names)
    with torch.no_grad():
        entry.local.copy_(part)

