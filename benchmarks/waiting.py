"""One gloo collective at a time: torch's against fxpar's (`fxpar.ops.exchange`, `fxpar.ops.waiting`).

Two gloo ranks, one thread each; every iteration starts at a barrier and times one
collective of a float32 buffer, the sides interleaved iteration by iteration (order rotated):

    all-reduce      gloo      torch's functional all_reduce + wait_tensor
                    fxpar     `waiting.all_reduce`: on 2 ranks one exchange (each rank sends
                              its buffer to the other) and the sum
    all-gather      gloo      torch's functional all_gather_into_tensor + wait_tensor (gloo
                              gathers into a buffer of its own and copies each block out)
                    fxpar     `waiting.all_gather`: this rank's block sent to every other rank,
                              theirs received in place
    reduce-scatter  gloo      torch's functional reduce_scatter_tensor + wait_tensor (gloo
                              all-reduces the whole buffer and keeps this rank's block)
                    fxpar     `waiting.reduce_scatter`: block r sent to rank r, the blocks for
                              this rank received and summed in rank order

The size is the buffer each rank puts in (the all-gather's output is twice it).
Run: `python -m benchmarks.waiting [--iters 60]`. Prints median and mean milliseconds, and the CPU
milliseconds of the rank (its gloo threads included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

SIZES_KIB = (64, 256, 1024, 4096)


def _sides(name: str, n: int) -> dict:
    from fxpar.ops import waiting

    c10d = waiting._c10d
    return {
        "all-reduce": {"gloo": lambda x: c10d.wait_tensor(c10d.all_reduce(x, "sum", name)),
                       "fxpar": lambda x: waiting.all_reduce(x, "sum", name)},
        "all-gather": {"gloo": lambda x: c10d.wait_tensor(c10d.all_gather_into_tensor(x, n, name)),
                       "fxpar": lambda x: waiting.all_gather(x, n, name)},
        "reduce-scatter": {"gloo": lambda x: c10d.wait_tensor(c10d.reduce_scatter_tensor(x, "sum", n, name)),
                           "fxpar": lambda x: waiting.reduce_scatter(x, n, name)},
    }


def _rank(iters: int) -> dict:
    from fxpar.ops import waiting
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    name = mesh.get_group("tp").group_name
    n = dist.get_world_size()
    out: dict = {}
    os.environ.pop(waiting.SPIN_ENV, None)
    for kind, sides in _sides(name, n).items():
        for kib in SIZES_KIB:
            x = torch.randn(kib * 256)
            results = {side: fn(x) for side, fn in sides.items()}
            first = next(iter(results.values()))
            same = all(torch.equal(first, r) for r in results.values())
            names = list(sides)
            times: dict[str, list[tuple[float, float]]] = {side: [] for side in names}
            for i in range(iters + 3):
                for side in names[i % len(names):] + names[:i % len(names)]:
                    dist.barrier()
                    t0, c0 = time.perf_counter(), time.process_time()
                    sides[side](x)
                    if i >= 3:
                        times[side].append((time.perf_counter() - t0, time.process_time() - c0))
            out[(kind, kib)] = {"same": same, **_summary(times)}
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
        res = pool.run(_rank, args.iters, timeout=900)[0]
    print(f"gloo collectives, 2 ranks, {args.iters} iterations each side; load {load[0]:.1f} before")
    for kind in ("all-reduce", "all-gather", "reduce-scatter"):
        rows = {kib: r for (k, kib), r in res.items() if k == kind}
        sides = [s for s in next(iter(rows.values())) if s != "same"]
        print(f"\n{kind}")
        print("| size | " + " | ".join(f"{s} median / mean (ms)" for s in sides)
              + " | fxpar / gloo (mean) | CPU " + " / ".join(sides) + " (ms) | equal |")
        print("|---|" + "---|" * (len(sides) + 3))
        for kib, r in rows.items():
            cells = " | ".join(f"{r[s]['median_ms']:.3f} / {r[s]['mean_ms']:.3f}" for s in sides)
            cpu = " / ".join(f"{r[s]['cpu_ms']:.3f}" for s in sides)
            ratio = r["fxpar"]["mean_ms"] / r["gloo"]["mean_ms"]
            print(f"| {kib} KiB | {cells} | {ratio:.2f} | {cpu} | {'yes' if r['same'] else 'NO'} |")


if __name__ == "__main__":
    main()
