"""Hugging Face safetensors folders, read and written shard by shard.

    load_hf(pm, path)   each rank reads only the slices it holds (safetensors `safe_open(...).get_slice`),
                        one tensor at a time, straight into its local shards (dtype converted on copy)
    save_hf(pm, path)   one full tensor at a time is gathered (every rank takes part) and appended by the
                        writing rank (coordinate 0 on every mesh dim) to a folder `from_pretrained` loads:
                        model.safetensors, or model-0000i-of-0000n.safetensors shards with
                        model.safetensors.index.json, and config.json when the model has a config

Names: the checkpoint's keys are the model's FQNs (as `save_pretrained` writes
them for the same class). A key also matches with the model's
`base_model_prefix` added or removed (a `GPT2Model` checkpoint loads into
`GPT2LMHeadModel`). Tied weights (GPT-2's wte / lm_head) are one tensor here,
loaded from whichever of their names the checkpoint has and saved once, under
the first name in the model's state_dict order (as `save_pretrained` drops the
tied copies). Buffers that are not persistent (rotary inv_freq) are neither
loaded nor saved: the model computes them.

Memory: a rank holds its shards, plus while loading one tensor's local slice
(read from the memory-mapped file; the file is closed after each tensor so its
pages are released), and while saving one full tensor (the writer) or one full
tensor's gather buffers (the others).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from fxpar.core.errors import PlanError
from fxpar.passes.shard_parameters import local_chunk
from fxpar.runtime.materialize import LocalTensor, local_slices, local_tensors, to_stored

__all__ = ["load_hf", "save_hf", "LoadReport"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass
class LoadReport:
    """What load_hf read.

    Attributes:
        loaded: model FQNs (canonical name of each tensor) read from the checkpoint.
        missing: model FQNs the checkpoint lacks (left as they were).
        unexpected: checkpoint keys no model tensor takes.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what the model holds


def _unique(entries: dict[str, LocalTensor]) -> list[LocalTensor]:
    seen: dict[int, LocalTensor] = {}
    for entry in entries.values():
        seen.setdefault(id(entry), entry)
    return list(seen.values())


def _persistent(pm: Any, entries: dict[str, LocalTensor]) -> list[tuple[str, LocalTensor]]:
    """(checkpoint name, tensor) for each persistent tensor once, in the model's state_dict order."""
    model = pm.source_model
    if model is None:
        raise PlanError("this ParallelModule keeps no model structure (was it built by fxpar.parallelize?); "
                        "fxpar.checkpoint needs it to know persistent names and the config")
    out, seen = [], set()
    for name in model.state_dict(keep_vars=True):
        entry = entries.get(name)
        if entry is None:
            raise PlanError(f"{name} of {type(model).__name__} has no tensor in the parallel module")
        if id(entry) not in seen:
            seen.add(id(entry))
            out.append((name, entry))
    return out


def _prefix(pm: Any) -> str:
    return getattr(pm.source_model, "base_model_prefix", "") or ""


def _candidates(fqn: str, prefix: str) -> list[str]:
    out = [fqn]
    if prefix:
        if fqn.startswith(prefix + "."):
            out.append(fqn[len(prefix) + 1:])
        else:
            out.append(f"{prefix}.{fqn}")
    return out


# --------------------------------------------------------------------------- load


def _weight_map(path: str) -> dict[str, str]:
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, SINGLE_FILE)
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: neither {SINGLE_FILE} nor {INDEX_FILE} (a Hugging Face safetensors folder)")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def _read(sl: Any, ranges: list[list[tuple[int, int]]], at: tuple = ()) -> torch.Tensor:
    """The local part from a safetensors slice: one read per product of ranges, concatenated in local order."""
    d = len(at)
    if d == len(ranges):
        return sl[tuple(slice(a, b) for a, b in at)]
    parts = [_read(sl, ranges, at + (r,)) for r in ranges[d]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=d)


def _load_one(file: str, key: str, entry: LocalTensor, pm: Any) -> None:
    with safe_open(file, framework="pt", device="cpu") as f:
        if not entry.full_shape:
            part = f.get_tensor(key)
        elif entry.stored_as is not None:  # stored by heads (unflatten_heads): read whole, cut as the graph holds it
            full = f.get_tensor(key)
            if tuple(full.shape) != entry.stored_as:
                raise PlanError(f"{key} in {file} has shape {tuple(full.shape)}; the model's {entry.fqns[0]} is "
                                f"{entry.stored_as}")
            part = local_chunk(to_stored(full, entry), entry.spec.placements, pm.mesh_info.sizes,
                               pm.mesh_info.coordinate, pm.mesh_info.names)
        else:
            sl = f.get_slice(key)
            shape = tuple(sl.get_shape())
            if shape != entry.full_shape:
                raise PlanError(f"{key} in {file} has shape {shape}; the model's {entry.fqns[0]} is {entry.full_shape}")
            part = _read(sl, local_slices(entry, pm.mesh_info))
    with torch.no_grad():
        entry.local.copy_(part)
    del part


def load_hf(pm: Any, path: str, *, strict: bool = True) -> LoadReport:
    """Loads a Hugging Face safetensors folder into `pm`'s local shards, each rank reading only its slices.

    Args:
        pm: a ParallelModule from fxpar.parallelize (its model may have been built on meta).
        path: a folder with model.safetensors, or shards and model.safetensors.index.json.
        strict: raise if the checkpoint lacks a persistent tensor of the model.

    Returns:
        A LoadReport (loaded, missing, unexpected).

    Raises:
        FileNotFoundError: no safetensors checkpoint in `path`.
        PlanError: a shape differs from the model's, or (strict) a tensor is missing.
    """
    files = _weight_map(path)
    entries = local_tensors(pm.graph_module)
    prefix = _prefix(pm)
    report = LoadReport()
    used = set()
    for name, entry in _persistent(pm, entries):
        key = next((k for fqn in (name, *entry.fqns) for k in _candidates(fqn, prefix) if k in files), None)
        if key is None:
            report.missing.append(name)
            continue
        _load_one(files[key], key, entry, pm)
        used.add(key)
        report.loaded.append(name)
    report.unexpected = sorted(set(files) - used)
    if strict and report.missing:
        raise PlanError(f"{path} lacks {', '.join(report.missing)}; pass strict=False to keep their values")
    return report


# --------------------------------------------------------------------------- save


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _header(items: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> tuple[bytes, list[int]]:
    """The safetensors header of these tensors (in order) and each tensor's byte size."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    sizes, offset = [], 0
    for key, dtype, shape in items:
        if dtype not in _DTYPES:
            raise PlanError(f"{key}: dtype {dtype} has no safetensors name")
        n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        meta[key] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        sizes.append(n)
        offset += n
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, sizes


def _barrier(pm: Any) -> None:
    """Every rank of the mesh waits for the writer (each mesh dim's group in turn)."""
    mesh = pm.mesh
    if mesh is None:
        return
    for d in range(mesh.ndim):
        dist.barrier(group=mesh.get_group(d))


def save_hf(pm: Any, path: str, *, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None) -> list[str]:
    """Writes `pm`'s model as a Hugging Face safetensors folder, one full tensor at a time.

    Every rank must call it (tensors are gathered over the mesh); the rank at coordinate 0 of
    every mesh dim writes.

    Args:
        pm: a ParallelModule from fxpar.parallelize.
        path: the folder (created).
        max_shard_size: bytes per file ('5GB', '100KB' or an int); more makes shards and an index.
        dtype: convert floating tensors to this dtype (default: as the model holds them).

    Returns:
        The files written (on the writing rank; [] elsewhere).
    """
    entries = local_tensors(pm.graph_module)
    tensors = _persistent(pm, entries)
    info = pm.mesh_info
    writer = info.coordinate is None or all(c == 0 for c in info.coordinate)

    def out_dtype(entry: LocalTensor) -> torch.dtype:
        return dtype if dtype is not None and entry.local.is_floating_point() else entry.local.dtype

    items = [(name, out_dtype(e), e.model_shape) for name, e in tensors]  # a reshaped one's bytes are the same
    _, sizes = _header(items)
    limit = _parse_size(max_shard_size)
    groups: list[list[int]] = [[]]
    total = 0
    for i, n in enumerate(sizes):
        if groups[-1] and total + n > limit:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    names = [SINGLE_FILE] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    if writer:
        os.makedirs(path, exist_ok=True)
    written = []
    for fname, group in zip(names, groups):
        header, _ = _header([items[i] for i in group])
        f = open(os.path.join(path, fname), "wb") if writer else None
        try:
            if f is not None:
                f.write(header)
            for i in group:
                full = pm.gather_full(tensors[i][1])  # a collective: every rank, same order
                if f is not None:
                    data = full.detach().to("cpu", items[i][1]).contiguous().reshape(-1)
                    f.write(data.view(torch.uint8).numpy().tobytes())
                del full
        finally:
            if f is not None:
                f.close()
        if writer:
            written.append(os.path.join(path, fname))
    if writer:
        if len(names) > 1:
            weight_map = {items[i][0]: fname for fname, group in zip(names, groups) for i in group}
            with open(os.path.join(path, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, f, indent=2)
            written.append(os.path.join(path, INDEX_FILE))
        config = getattr(pm.source_model, "config", None)
        if config is not None and hasattr(config, "save_pretrained"):
            config.save_pretrained(path)
            written.append(os.path.join(path, "config.json"))
    _barrier(pm)
    return written
