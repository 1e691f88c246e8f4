"""The model's own initialization, written shard by shard: `pm.init_weights(seed)` and computed buffers.

    init_weights(pm, seed)   every rank's shards equal the single-process init:
                             torch.manual_seed(seed); <the model's init>(model)
    compute_buffers(pm)      buffers the model computes (rotary inv_freq, BatchNorm statistics' defaults),
                             at parallelize, for a model built on meta

The model's init (`model_init`: Hugging Face / torchtitan `init_weights()`, else
`reset_parameters()` of every module in `modules()` order, which is the order
a plain module's constructor runs them) runs on a meta copy of the model
(`fxpar.runtime.materialize.meta_skeleton`) under a dispatch mode, `_Redirect`.
Every aten op that touches a tracked meta tensor, or a view or `.data` of one
(matched by storage), runs instead on a real full tensor of that parameter on
the mesh's device, allocated at its first touch. When an op touches other
tensors, the previous full tensor is finished: this rank's slice is copied into
its shard (`write_full`) and the full tensor is freed. Hence:

  - the ops that run are the single-process init's, in its order, on tensors of
    the same shape, dtype and device: the generator advances exactly as it
    would, and every shard is bit-equal to the same slice of the plain init;
  - a rank holds at most the tensors of one op in full (one parameter, almost
    always).

A tensor touched again after it was finished (GPT-2's `c_proj.weight`: drawn at
its Conv1D, drawn again at its attention module) is allocated anew if the op
only writes it (`_WRITE_ONLY`, as a whole), else gathered back from the shards
(a collective; every rank runs the same init, so every rank issues it in the
same order). A first touch that reads starts from the shards' current values.

Where equality cannot hold, and what happens:

  - a parameter no init touches (an `nn.Parameter(torch.randn(...))` made in
    `__init__` with no `reset_parameters`): its values came from the
    constructor's random stream, which no init replays. It keeps its current
    values (zeros after parallelize of a meta model) and is listed in the
    returned report and in `pm.explain()`.
  - an init that replaces tensors (`self.freqs = compute()`, torchtitan's
    buffers) instead of writing them: the new tensor is copied in after the init
    (equal), but it was allocated in full by the model's code.
  - an init that draws random numbers on a device other than the mesh's (a
    CPU init compared with a CUDA mesh): different generators, different values.
"""

from __future__ import annotations

import inspect
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from fxpar._torch.dispatch import TorchDispatchMode, storage_key
from fxpar._torch.fx import pytree
from fxpar.core.errors import PlanError
from fxpar.runtime.materialize import LocalTensor, local_tensors, meta_skeleton, write_full

__all__ = ["InitReport", "init_weights", "compute_buffers", "model_init"]

log = logging.getLogger(__name__)

_aten = torch.ops.aten
# Ops that read no value of their first argument (they overwrite it, or only take its dtype and device).
_WRITE_ONLY = {
    _aten.normal_, _aten.uniform_, _aten.zero_, _aten.fill_, _aten.random_, _aten.exponential_,
    _aten.geometric_, _aten.log_normal_, _aten.cauchy_, _aten.bernoulli_, _aten.copy_,
    _aten.new_empty, _aten.new_empty_strided, _aten.new_zeros, _aten.new_ones, _aten.new_full,
    _aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like, _aten.rand_like, _aten.randn_like,
}


@dataclass
class InitReport:
    """What `init_weights` / `compute_buffers` did.

    Attributes:
        how: the init that ran ('init_weights()', 'reset_parameters() per module').
        seed: the seed used.
        initialized: canonical FQNs the init wrote.
        untouched: canonical FQNs of parameters the init never wrote (values not equal to the
            single-process model's: they came from its constructor).
        gathered: FQNs whose shards had to be gathered because the init read them after they were finished.
    """

    how: str = ""
    seed: int | None = None
    initialized: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    gathered: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"init_weights: {self.how}, seed {self.seed}: {len(self.initialized)} tensors initialized "
               "shard by shard, equal to the single-process init"]
        if self.untouched:
            out.append(f"  not equal to the single-process model (no init writes them; they keep their values): "
                       f"{', '.join(self.untouched)}")
        if self.gathered:
            out.append(f"  gathered back to be read by the init: {', '.join(self.gathered)}")
        return out


def model_init(model: nn.Module, device: torch.device) -> tuple[str, Callable[[], Any]]:
    """The model's own initialization as (description, zero-argument callable), run on `model`.

    `init_weights()` if the model has one (Hugging Face PreTrainedModel, torchtitan; a
    `buffer_device` argument gets the mesh's device), else `reset_parameters()` of every
    module that has one, in `model.modules()` order.
    """
    fn = getattr(model, "init_weights", None)
    if callable(fn):
        params = inspect.signature(fn).parameters
        if "buffer_device" in params:
            return "init_weights(buffer_device)", lambda: fn(buffer_device=device)
        return "init_weights()", fn

    def reset_all() -> None:
        for m in model.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()

    return "reset_parameters() per module", reset_all


@dataclass(eq=False)
class _Slot:
    """One tracked meta tensor of the skeleton and where its values go."""

    name: str
    meta: torch.Tensor
    entry: LocalTensor | None
    opened: bool = False
    finished: bool = False


class _Redirect(TorchDispatchMode):
    """Runs ops on tracked meta tensors against real full tensors, finishing each when others are touched."""

    def __init__(self, slots: dict[int, _Slot], device: torch.device, mesh, gather: Callable) -> None:
        super().__init__()
        self.slots, self.device, self.mesh, self.gather = slots, device, mesh, gather
        self.live: dict[int, torch.Tensor] = {}
        self.gathered: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = pytree.tree_flatten((args, kwargs))
        hits = []
        for i, a in enumerate(flat):
            if isinstance(a, torch.Tensor) and a.device.type == "meta":
                key = storage_key(a)
                if key in self.slots:
                    hits.append((i, key, a))
        if not hits:
            return func(*args, **kwargs)
        keys = {key for _, key, _ in hits}
        for key in [k for k in self.live if k not in keys]:
            self.finish(key)
        for i, key, a in hits:
            slot = self.slots[key]
            whole = _whole(a, slot.meta)
            if key not in self.live:
                self.live[key] = self._open(slot, i == 0 and whole and func.overloadpacket in _WRITE_ONLY)
            full = self.live[key]
            flat[i] = full if whole else full.as_strided(a.size(), a.stride(), a.storage_offset())
        args, kwargs = pytree.tree_unflatten(flat, spec)
        return func(*args, **kwargs)

    def _open(self, slot: _Slot, writes_only: bool) -> torch.Tensor:
        m = slot.meta
        if writes_only or slot.entry is None:
            full = torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=self.device)
        else:  # the op reads it: start from the shards' values, as the one process would hold them
            self.gathered.append(slot.name)
            full = self.gather(slot.entry).to(self.device)
        slot.opened = True
        return full

    def finish(self, key: int) -> None:
        full = self.live.pop(key)
        slot = self.slots[key]
        if slot.entry is not None:
            write_full(slot.entry, full, self.mesh)
        slot.finished = True

    def finish_all(self) -> None:
        for key in list(self.live):
            self.finish(key)


def _whole(a: torch.Tensor, meta: torch.Tensor) -> bool:
    return a.size() == meta.size() and a.stride() == meta.stride() and a.storage_offset() == meta.storage_offset()


def _clear_hf_flags(model: nn.Module) -> None:
    """Hugging Face skips modules and tensors flagged initialized (by an earlier init or a load)."""
    for obj in [*model.modules(), *model.parameters(), *model.buffers()]:
        if getattr(obj, "_is_hf_initialized", False):
            try:
                delattr(obj, "_is_hf_initialized")
            except AttributeError:
                pass


def _run(pm, work: nn.Module, tracked: list[tuple[str, torch.Tensor]], seed: int) -> tuple[InitReport, dict]:
    """Runs the model's init on `work` with `tracked` (FQN, meta tensor) redirected to this rank's shards."""
    device = pm.local_device
    entries = local_tensors(pm.graph_module)
    slots: dict[int, _Slot] = {}
    for fqn, t in tracked:
        key = storage_key(t)
        if key not in slots:
            slots[key] = _Slot(fqn, t, entries.get(fqn))
    how, fn = model_init(work, device)
    _clear_hf_flags(work)
    mode = _Redirect(slots, device, pm.mesh_info, pm.gather_full)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        with mode:
            fn()
        mode.finish_all()
    # Tensors the init replaced by real ones (torchtitan's freqs_cis) instead of writing them.
    replaced = {}
    for fqn, t in [*work.named_parameters(remove_duplicate=False), *work.named_buffers(remove_duplicate=False)]:
        if t.device.type != "meta" and fqn in entries:
            write_full(entries[fqn], t.detach().to(device), pm.mesh_info)
            replaced[fqn] = True
    report = InitReport(how=how, seed=seed, gathered=mode.gathered)
    for slot in slots.values():
        name = slot.entry.fqns[0] if slot.entry is not None else slot.name
        if slot.opened or any(f in replaced for f in (slot.entry.fqns if slot.entry else (slot.name,))):
            report.initialized.append(name)
        else:
            report.untouched.append(name)
    return report, replaced


def _agreed_seed(pm) -> int:
    """A fresh seed, the same on every rank (rank 0's, broadcast over the world)."""
    seed = secrets.randbits(62)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        ranks = pm.mesh.mesh.numel() if pm.mesh is not None else world
        if ranks != world:
            raise PlanError(f"init_weights(seed=None) on a mesh of {ranks} of {world} ranks: pass seed= "
                            "(the same on every rank) so that all ranks draw the same values")
        box = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def init_weights(pm, seed: int | None = None) -> InitReport:
    """Initializes `pm`'s shards as the model's own init on one process would, one full tensor at a time.

    Args:
        pm: a ParallelModule (of a meta-device model or not).
        seed: `torch.manual_seed(seed)` before the model's init; None draws one seed shared by all ranks.
            The global random state is left as it was (torch.random.fork_rng).

    Returns:
        An InitReport (also kept for `pm.explain()`): tensors initialized, parameters no init touches.
    """
    if pm.source_model is None:
        raise PlanError("init_weights needs the model's structure; this module was not built by parallelize")
    seed = _agreed_seed(pm) if seed is None else int(seed)
    work = meta_skeleton(pm.source_model, buffers=True)
    tracked = [*work.named_parameters(remove_duplicate=False), *work.named_buffers(remove_duplicate=False)]
    report, _ = _run(pm, work, tracked, seed)
    # Buffers no init recomputes keep the values they have (computed at parallelize, or loaded).
    params = {fqn for fqn, _ in work.named_parameters(remove_duplicate=False)}
    report.untouched = [f for f in report.untouched if f in params]
    if report.untouched:
        log.warning("init_weights: no init of %s writes %s; they keep their values", type(work).__name__,
                    ", ".join(report.untouched))
    return report


def compute_buffers(pm) -> InitReport:
    """At parallelize, for a meta-device model: the buffers the model's own code computes.

    Runs the model's init on a meta copy with only its meta buffers redirected (parameters stay
    meta: their ops are free and draw nothing); buffers that were real in the model are copied.

    Raises:
        PlanError: a non-persistent buffer (never in a checkpoint) that no init computes.
    """
    skeleton = pm.source_model
    work = meta_skeleton(skeleton)
    entries = local_tensors(pm.graph_module)
    tracked = [(fqn, b) for fqn, b in work.named_buffers(remove_duplicate=False) if b.device.type == "meta"]
    for fqn, b in skeleton.named_buffers(remove_duplicate=False):
        if b.device.type != "meta" and fqn in entries:
            write_full(entries[fqn], b.detach().to(pm.local_device), pm.mesh_info)
    if not tracked:
        return InitReport(how="no meta buffers")
    report, _ = _run(pm, work, tracked, seed=0)
    persistent = set(skeleton.state_dict(keep_vars=True))
    missing = [f for f in report.untouched if f not in persistent]
    if missing:
        raise PlanError(
            f"buffers {', '.join(missing)} of {type(skeleton).__name__} are on the meta device, are not saved in "
            "checkpoints (persistent=False), and no init of the model computes them; create them on a real "
            "device in __init__ (e.g. device='cpu' for buffers), or give their module a reset_parameters() "
            "that writes them in place")
    return report
