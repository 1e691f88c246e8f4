"""How long a gloo all-reduce takes when the waiting thread sleeps (c10d's wait) or polls (`fxpar.ops.waiting`).

Two gloo ranks, one thread each; every iteration starts at a barrier and times one
all-reduce of a float32 buffer, the two ways interleaved iteration by iteration:

    blocking   torch's functional all_reduce + wait_tensor (FXPAR_WAIT_SPIN_MS=0)
    polled     c10d all_reduce(async_op=True), then Work.is_completed() polled with
               sched_yield for at most 10 ms, then Work.wait()

Then one reduce-scatter (sum) of each size, the two ways interleaved the same way:

    gloo       torch's functional reduce_scatter_tensor + wait_tensor (gloo all-reduces
               the whole buffer and keeps this rank's block)
    fxpar      `fxpar.ops.waiting.reduce_scatter`: an all-to-all (block r of every rank
               to rank r) and the sum of the n blocks received

Run: `python -m benchmarks.waiting [--iters 60]`. Prints median and mean milliseconds and the CPU
milliseconds of the rank (polling spends its wait on the CPU, yielding).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

SIZES_KIB = (64, 256, 1024, 4096)


def _rank(iters: int) -> dict:
    from fxpar.ops import waiting
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    name = mesh.get_group("tp").group_name
    out = {}
    for kib in SIZES_KIB:
        x = torch.randn(kib * 256)
        times: dict[str, list[tuple[float, float]]] = {"blocking": [], "polled": []}
        for i in range(iters + 3):
            for side in (("blocking", "polled") if i % 2 else ("polled", "blocking")):
                os.environ[waiting.SPIN_ENV] = "0" if side == "blocking" else "10"
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                waiting.all_reduce(x, "sum", name)
                if i >= 3:
                    times[side].append((time.perf_counter() - t0, time.process_time() - c0))
        os.environ.pop(waiting.SPIN_ENV, None)
        out[kib] = _summary(times)
    n = dist.get_world_size()
    for kib in SIZES_KIB:
        x = torch.randn(kib * 256)
        times = {"gloo": [], "fxpar": []}
        for i in range(iters + 3):
            for side in (("gloo", "fxpar") if i % 2 else ("fxpar", "gloo")):
                dist.barrier()
                t0, c0 = time.perf_counter(), time.process_time()
                if side == "gloo":
                    waiting._c10d.wait_tensor(waiting._c10d.reduce_scatter_tensor(x, "sum", n, name))
                else:
                    waiting.reduce_scatter(x, n, name)
                if i >= 3:
                    times[side].append((time.perf_counter() - t0, time.process_time() - c0))
        out[f"rs {kib}"] = _summary(times)
    return out


def _summary(times: dict) -> dict:
    return {side: {"median_ms": 1e3 * statistics.median(w for w, _ in v),
                   "mean_ms": 1e3 * statistics.fmean(w for w, _ in v),
                   "cpu_ms": 1e3 * statistics.fmean(c for _, c in v)} for side, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    from fxpar.testing import RankPool

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=60)
    args = ap.parse_args(argv)
    load = os.getloadavg()
    with RankPool(2) as pool:
        res = pool.run(_rank, args.iters, timeout=600)[0]
    print(f"gloo all-reduce, 2 ranks, {args.iters} iterations each way; load {load[0]:.1f} before")
    print("| size | blocking median / mean (ms) | polled median / mean (ms) | mean ratio | CPU blocking / polled (ms) |")
    print("|---|---|---|---|---|")
    for kib, r in res.items():
        if "blocking" not in r:
            continue
        b, p = r["blocking"], r["polled"]
        print(f"| {kib} KiB | {b['median_ms']:.3f} / {b['mean_ms']:.3f} | {p['median_ms']:.3f} / {p['mean_ms']:.3f} | "
              f"{p['mean_ms'] / b['mean_ms']:.2f} | {b['cpu_ms']:.3f} / {p['cpu_ms']:.3f} |")

    print(f"\ngloo reduce-scatter, 2 ranks, {args.iters} iterations each way")
    print("| size | gloo median / mean (ms) | fxpar (all-to-all + sum) median / mean (ms) | mean ratio |")
    print("|---|---|---|---|")
    for key, r in res.items():
        if "gloo" in r:
            g, f = r["gloo"], r["fxpar"]
            print(f"| {key[3:]} KiB | {g['median_ms']:.3f} / {g['mean_ms']:.3f} | {f['median_ms']:.3f} / "
                  f"{f['mean_ms']:.3f} | {f['mean_ms'] / g['mean_ms']:.2f} |")


if __name__ == "__main__":
    main()
