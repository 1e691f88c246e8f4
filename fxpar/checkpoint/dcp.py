"""fxpar.checkpoint.save / load on torch.distributed.checkpoint: atomic folders, async saves, resharding on load.

The layouts and state dicts are `fxpar.runtime.state_dict`'s (its docstring says how a shard becomes a
block DCP can reshard).
"""

from __future__ import annotations

import concurrent.futures
import glob
import logging
import os
import re
import shutil
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor

from fxpar.core.errors import CheckpointError
from fxpar.runtime.state_dict import (
    EXTRA,
    OPTIM_GROUPS,
    OPTIM_STATE,
    _from_dcp,
    _mismatch_message,
    _optimizer_state,
    _target,
    _Tensor,
    _tensors,
    model_state_dict,
)

__all__ = ["save", "load"]

log = logging.getLogger(__name__)


def _save_planner() -> DefaultSavePlanner:
    # The state dict is flat already: DCP's flattening would split `extra` and the param groups into
    # one key per leaf; kept whole, each is one pickled object.
    return DefaultSavePlanner(flatten_state_dict=False)


def _next_tmp(path: str) -> str:
    """`<path>.tmp-<n>` with n one past any left by earlier (crashed) saves; chosen by rank 0."""
    box = [None]
    if dist.get_rank() == 0:
        taken = [int(m.group(1)) for f in glob.glob(glob.escape(path) + ".tmp-*")
                 if (m := re.search(r"\.tmp-(\d+)$", f))]
        box[0] = f"{path}.tmp-{max(taken, default=0) + 1}"
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _commit(tmp: str, path: str) -> None:
    """Rank 0: puts the finished checkpoint `tmp` at `path` (the old one aside first, then deleted)."""
    old = None
    if os.path.exists(path):
        old = tmp.replace(".tmp-", ".old-")
        os.rename(path, old)
    os.rename(tmp, path)
    parent = os.path.dirname(os.path.abspath(path))
    fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".old-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by crashed saves


def _wait_pending(pm) -> None:
    fut = pm.__dict__.pop("_fxpar_ckpt_pending", None)
    if fut is not None:
        fut.result()


def save(pm, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, extra: Any = None,
         async_save: bool = False) -> concurrent.futures.Future | None:
    """Saves a ParallelModule (and its optimizer) as a DCP checkpoint folder. Collective: call on every rank.

    Args:
        pm: the ParallelModule or PipelineModule.
        path: the checkpoint folder; replaced atomically if it exists.
        optimizer: a torch optimizer over `pm.parameters()` (state keyed by parameter FQN).
        extra: picklable user state (step counter, data loader state, RNG states), as rank 0 has it.
        async_save: write in the background (`dcp.async_save`): returns once the state is staged (copied),
            so training can go on; the returned future's `result()` waits for the write.

    Returns:
        None, or (async_save) a future; the checkpoint is at `path` once rank 0's future is done. The next
        save or load of `pm` waits for it.
    """
    _wait_pending(pm)
    path = os.fspath(path)
    entries = _tensors(pm)
    state = model_state_dict(pm)
    if optimizer is not None:
        state.update(_optimizer_state(pm, optimizer, entries))
    box = [extra]
    dist.broadcast_object_list(box, src=0)  # DCP writes one copy of an object: rank 0's
    state[EXTRA] = box[0]
    tmp = _next_tmp(path)
    writer = dcp.FileSystemWriter(tmp)
    if not async_save:
        dcp.save(state, storage_writer=writer, planner=_save_planner())
        if dist.get_rank() == 0:
            _commit(tmp, path)
        dist.barrier()
        return None
    group = pm.__dict__.get("_fxpar_ckpt_group")
    if group is None:  # the background thread's collectives must not interleave with training's
        group = pm.__dict__["_fxpar_ckpt_group"] = dist.new_group(backend="gloo")
    response = dcp.async_save(state, storage_writer=writer, planner=_save_planner(), process_group=group)
    inner = getattr(response, "upload_completion", response)
    done: concurrent.futures.Future = concurrent.futures.Future()
    is_zero = dist.get_rank() == 0

    def finish(f) -> None:
        try:
            f.result()
            if is_zero:
                _commit(tmp, path)
            done.set_result(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller through the future
            done.set_exception(exc)

    inner.add_done_callback(finish)
    pm.__dict__["_fxpar_ckpt_pending"] = done
    return done


# --------------------------------------------------------------------------- load


def _resolve(path: str) -> str:
    """The complete checkpoint folder for `path`, recovering from a crash during the final renames."""
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    for pattern in (".tmp-*", ".old-*"):  # a finished save not yet renamed is newer than one set aside
        found = sorted((f for f in glob.glob(glob.escape(path) + pattern)
                        if os.path.exists(os.path.join(f, ".metadata"))), key=os.path.getmtime)
        if found and not os.path.exists(path):
            log.warning("checkpoint %s is missing; loading %s (a save was interrupted while renaming)",
                        path, found[-1])
            return found[-1]
    raise CheckpointError(f"no checkpoint at {path!r} (no DCP .metadata there); save one with "
                          "fxpar.checkpoint.save(pm, path)")


def _global_shapes(entries: list[_Tensor]) -> dict[str, tuple[int, ...]]:
    """FQN -> global shape of every tensor of the model, from all ranks (pipeline ranks hold a part each)."""
    mine = {fqn: e.layout.shape for e in entries for fqn in e.fqns}
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    out: dict[str, tuple[int, ...]] = {}
    for part in parts:
        out.update(part)
    return out


def load(pm, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
         strict: bool = True) -> Any:
    """Loads a checkpoint saved by `save` on any mesh into this module (and optimizer). Collective.

    Parameters and buffers are loaded in place into this rank's shards; the optimizer's state is
    created on them (exp_avg, exp_avg_sq sharded like their parameter) and its hyperparameters set.

    Args:
        pm: the ParallelModule or PipelineModule to load into.
        path: the checkpoint folder.
        optimizer: a torch optimizer over `pm.parameters()`, of the kind that saved the state.
        strict: refuse a checkpoint whose FQNs or shapes differ from the model's; False loads the
            tensors that match and logs what it skipped.

    Returns:
        The `extra` state given to `save` (None if none).

    Raises:
        CheckpointError: no checkpoint at `path`, or (strict) missing, unexpected or mismatched FQNs.
    """
    _wait_pending(pm)
    dist.barrier()  # a save's rename on rank 0 is done before any rank looks
    folder = _resolve(os.fspath(path))
    reader = dcp.FileSystemReader(folder)
    saved = reader.read_metadata().state_dict_metadata
    entries = _tensors(pm)
    model = _global_shapes(entries)
    in_ckpt = {k: tuple(m.size) for k, m in saved.items()
               if not k.startswith(OPTIM_STATE) and k not in (OPTIM_GROUPS, EXTRA)
               and isinstance(m, TensorStorageMetadata)}
    missing = sorted(k for k in model if k not in in_ckpt)
    unexpected = sorted(k for k in in_ckpt if k not in model)
    mismatched = {k: (in_ckpt[k], model[k]) for k in model if k in in_ckpt and in_ckpt[k] != model[k]}
    if missing or unexpected or mismatched:
        message = _mismatch_message(f"the checkpoint {folder!r}", missing, unexpected, mismatched)
        if strict:
            raise CheckpointError(message + ". Is it a checkpoint of another model? strict=False loads the "
                                  "tensors that match and logs the rest")
        log.warning("loading the matching tensors only: %s", message)

    state: dict[str, Any] = {}
    post: list[tuple[_Tensor, torch.Tensor]] = []  # (entry, buffer) copied into the shards afterwards
    for e in entries:
        key = next((f for f in e.fqns if f in in_ckpt and f not in mismatched), None)
        if key is None:
            continue
        dtype = saved[key].properties.dtype
        target, buf = _target(pm, e.tensors[0], e.layout, dtype, into=e.tensors[0])
        state[key] = target
        post.append((e, buf))
    optim: list[tuple[_Tensor, str, Any, str]] = []  # (entry, state name, local buffer or None, key)
    if optimizer is not None:
        params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for e in entries:
            if not e.is_param or id(e.tensors[0]) not in params or e.fqns[0] in mismatched:
                continue
            prefix = f"{OPTIM_STATE}{e.fqns[0]}."
            for key in (k for k in saved if k.startswith(prefix) and "." not in k[len(prefix):]):
                md = saved[key]
                if isinstance(md, TensorStorageMetadata) and tuple(md.size) == e.layout.shape and md.size:
                    target, buf = _target(pm, e.tensors[0], e.layout, md.properties.dtype)
                elif isinstance(md, TensorStorageMetadata):
                    target = buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                else:
                    target = buf = None
                state[key] = target
                optim.append((e, key[len(prefix):], buf, key))
        if OPTIM_GROUPS in saved:
            state[OPTIM_GROUPS] = None
        else:
            log.warning("the checkpoint %s holds no optimizer state; the optimizer is left as it is", folder)
    if EXTRA in saved:
        state[EXTRA] = None
    dcp.load(state, storage_reader=reader, planner=DefaultLoadPlanner(flatten_state_dict=False, flatten_sharded_tensors=False))

    with torch.no_grad():
        for e, buf in post:
            local = _from_dcp(pm, buf, e.layout)
            for t in e.tensors:
                if t.data_ptr() != local.data_ptr():
                    t.copy_(local)
    if optimizer is not None:
        for e, name, buf, key in optim:
            if isinstance(state[key], DTensor):  # sharded like its parameter: this rank's shard
                value = _from_dcp(pm, buf, e.layout).contiguous()
            else:
                value = state[key]  # a plain tensor loaded in place (step), or an object
            for i, t in enumerate(e.tensors):
                if id(t) in params:
                    copy = isinstance(value, torch.Tensor) and i > 0
                    optimizer.state[t][name] = value.clone() if copy else value
        groups = state.get(OPTIM_GROUPS)
        if groups is not None:
            if len(groups) != len(optimizer.param_groups):
                log.warning("the checkpoint's optimizer has %d param groups, this one %d: hyperparameters "
                            "not loaded", len(groups), len(optimizer.param_groups))
            else:
                for g, saved_group in zip(optimizer.param_groups, groups):
                    g.update({k: v for k, v in saved_group.items() if k != "params"})
    return state.get(EXTRA)
