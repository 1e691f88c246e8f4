"""Section 4: compile time, capture (torch.export) and fxpar's own passes timed separately.

Runs in one fresh process with one thread, on torch's fake process-group
backend at world size 4 (rank 0 of a tp=4 mesh): compiling is per rank and
needs no peers, and one process on one core measures what a rank spends
without four of them fighting over two cores.

For each depth of the GPT-2-style model: `fxpar.capture` alone (wall and CPU
seconds, graph nodes), then `fxpar.parallelize(..., check=False)` whose pass
manager history gives each pass's seconds (`pm.history`); the passes are
repeated (median and minimum kept: on a shared machine the minimum is the
least disturbed sample), and run once more with Python's garbage
collector off (full collections scan a heap that grows with the graph, and
land in whichever pass is running). With `check=True` (the library default)
the invariant checks after every pass are timed too, at the smaller depths.
Reported: milliseconds of passes per 1,000 captured graph nodes, and the
ratio of pass time at 128 / 32 blocks (linear growth: 128 / 32 = 4 times the
nodes, so about 4).
"""

from __future__ import annotations

import cProfile
import gc
import multiprocessing as mp
import os
import pstats
import statistics
import time
from typing import Any

from benchmarks.models import ModelConfig, batch, build

__all__ = ["run", "compile_worker"]


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0, time.process_time() - c0


def _profile_passes(model, mesh, ids, top: int = 8) -> list[tuple[str, float, float]]:
    """The fxpar functions with the most own time during one parallelize (capture's torch code left out)."""
    import fxpar
    import fxpar.passes

    roots = [os.path.dirname(fxpar.__file__), os.path.dirname(fxpar.passes.__file__)]
    prof = cProfile.Profile()
    gc.collect()
    gc.disable()  # a collection pause would be charged to whichever function happens to allocate
    try:
        prof.enable()
        fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False)
        prof.disable()
    finally:
        gc.enable()
    rows = []
    for (filename, line, func), (_, _, tottime, cumtime, _) in pstats.Stats(prof).stats.items():
        root = next((r for r in roots if filename.startswith(r + os.sep)), None)
        if root is not None:
            where = os.path.relpath(filename, os.path.dirname(root)).replace(os.sep, "/")
            rows.append((f"{where}:{line} {func}", tottime, cumtime))
    rows.sort(key=lambda r: -r[1])
    return rows[:top]


def compile_worker(base: ModelConfig, layers: list[int], world: int, repeats: dict, check_layers: list[int],
                   profile_layers: int | None, warmup: bool = True) -> dict:
    """Body of the compile-time process (see the module docstring)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import fxpar

    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    # One-time costs (imports, export's first trace) are not part of any depth's time.
    if warmup:
        warm = base.with_layers(1)
        fxpar.parallelize(build(warm), mesh, example_inputs=(batch(warm)[0],), check=False)
    out: dict[str, Any] = {"world": world, "rows": []}
    for n_layers in layers:
        cfg = base.with_layers(n_layers)
        model = build(cfg)
        ids, _ = batch(cfg)
        gm, cap_s, cap_cpu = _timed(lambda: fxpar.capture(model, (ids,)))
        row: dict[str, Any] = {"layers": n_layers, "nodes": len(gm.graph.nodes), "capture_s": cap_s,
                               "capture_cpu_s": cap_cpu}
        del gm
        samples, per_pass, walls = [], [], []
        for _ in range(repeats.get(n_layers, 1)):
            gc.collect()  # start each sample from the same heap
            pm, wall, _ = _timed(lambda: fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False))
            samples.append(sum(r.seconds for r in pm.history))
            per_pass.append({r.name: r.seconds for r in pm.history})
            walls.append(wall)
            row["nodes_after"] = len(pm.graph_module.graph.nodes)
            del pm
        k = samples.index(statistics.median_low(samples))
        row["passes_s"] = samples[k]
        row["passes_min_s"] = min(samples)
        row["passes_all_s"] = samples
        row["per_pass_s"] = per_pass[k]
        row["parallelize_s"] = walls[k]
        # Python's full collections scan the whole heap, which grows with the graph: once more with the
        # collector off, to tell the passes' own work from collection pauses.
        gc.collect()
        gc.disable()
        try:
            pm, _, _ = _timed(lambda: fxpar.parallelize(model, mesh, example_inputs=(ids,), check=False))
        finally:
            gc.enable()
        row["passes_nogc_s"] = sum(r.seconds for r in pm.history)
        row["per_pass_nogc_s"] = {r.name: r.seconds for r in pm.history}
        del pm
        if n_layers in check_layers:
            pm, _, _ = _timed(lambda: fxpar.parallelize(model, mesh, example_inputs=(ids,), check=True))
            row["passes_with_checks_s"] = sum(r.seconds for r in pm.history)
        row["ms_per_1k_nodes"] = row["passes_s"] / row["nodes"] * 1e6
        row["ms_per_1k_nodes_nogc"] = row["passes_nogc_s"] / row["nodes"] * 1e6
        out["rows"].append(row)
        print(f"[compile] {n_layers} blocks: {row['nodes']} nodes, capture {cap_s:.2f}s, passes {row['passes_s']:.3f}s "
              f"= {row['ms_per_1k_nodes']:.0f} ms / 1,000 nodes", flush=True)
    if profile_layers:
        cfg = base.with_layers(profile_layers)
        out["profile_layers"] = profile_layers
        out["profile"] = _profile_passes(build(cfg), mesh, batch(cfg)[0])
    dist.destroy_process_group()
    return out


def run(base: ModelConfig, layers: list[int], opts: dict) -> dict:
    """Runs section 4 in a fresh process; returns its results (JSON-ready)."""
    print(f"[compile] {base.kind} at {layers} blocks (dim {base.dim}) ...", flush=True)
    t0 = time.perf_counter()
    # The forkserver fxpar.testing started has torch imported already: a fresh process in ~0.1 s.
    ctx = mp.get_context("forkserver")
    with ctx.Pool(1) as pool:
        res = pool.apply(compile_worker, (base, layers, opts["world"], opts["compile_repeats"],
                                          opts["check_layers"], opts.get("profile_layers"),
                                          opts.get("compile_warmup", True)))
    rows = {r["layers"]: r for r in res["rows"]}
    section: dict[str, Any] = {"title": "Compile time", "config": base.describe(), "world": res["world"],
                               "rows": res["rows"], "profile": res.get("profile", []),
                               "profile_layers": res.get("profile_layers")}
    lo, hi = layers[-2], layers[-1]
    section["ratio_pair"] = (hi, lo)
    section["passes_ratio"] = rows[hi]["passes_s"] / rows[lo]["passes_s"]
    section["passes_ratio_nogc"] = rows[hi]["passes_nogc_s"] / rows[lo]["passes_nogc_s"]
    section["passes_ratio_min"] = rows[hi]["passes_min_s"] / rows[lo]["passes_min_s"]
    section["nodes_ratio"] = rows[hi]["nodes"] / rows[lo]["nodes"]
    section["capture_ratio"] = rows[hi]["capture_s"] / rows[lo]["capture_s"]
    section["seconds"] = time.perf_counter() - t0
    print(f"[compile] passes {hi}/{lo} blocks = {section['passes_ratio']:.2f} "
          f"(nodes x{section['nodes_ratio']:.2f}); done in {section['seconds']:.0f}s", flush=True)
    return section
