"""fxpar fsdp compiled with and without `prefetch_fsdp_gathers` (the backward re-gather issued one block ahead),
side by side in the same 2 gloo rank processes (`harness.interleave`), on section 6's GPT, with an A-vs-A row.

    python -m benchmarks.fsdp_compile_prefetch 16      # 16 timed iterations per side; about 5 minutes
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import benchmarks.fsdp_compile_prefetch as ab  # the rank body by its module name (ranks are spawned)
import fxpar
import fxpar.runtime.parallel_module as PM
from benchmarks import harness as H
from benchmarks.models import batch, build, cross_entropy
from benchmarks.overlap import CONFIG
from fxpar.testing import run_ranks


def body(iters: int) -> dict:
    """Rank body: both sides compiled on their first step (the pass swapped in for the compile only), timed."""
    cfg = CONFIG
    n, r = dist.get_world_size(), dist.get_rank()
    mesh = torch.distributed.device_mesh.init_device_mesh("cpu", (n,), mesh_dim_names=("fsdp",))
    model = build(cfg); ids, target = batch(cfg)
    li, lt = ids.chunk(n)[r], target.chunk(n)[r]
    real = PM.prefetch_fsdp_gathers
    sides = {}
    for name, fn in (("compiled, no backward prefetch", lambda graph, groups: 0), ("compiled, prefetch_fsdp_gathers", real)):
        PM.prefetch_fsdp_gathers = fn
        pm = fxpar.parallelize(model, mesh, example_inputs=(li,), input_layout="local", compile=True)
        step = (lambda p: lambda: p.step(li, target=lt, loss_fn=cross_entropy))(pm)
        step()  # compiles now, with this pass
        sides[name] = (step, pm)
    PM.prefetch_fsdp_gathers = real
    variants = [H.Variant(k, s, (lambda m: lambda: m.zero_grad(set_to_none=True))(m)) for k, (s, m) in sides.items()]
    variants.append(H.Variant("no prefetch (again)", variants[0].run, variants[0].prepare))
    return H.interleave(variants, warmup=2, iters=iters)

if __name__ == "__main__":
    ranks = run_ranks(ab.body, 2, int(sys.argv[1]), timeout=1500)
    times = H.aggregate(ranks)
    names = list(times)
    for a, b in ((names[1], names[0]), (names[2], names[0])):
        st = H.pair_stats(times, a, b)
        print(f"{a} / {b}: wall {st['wall_ratio']:.3f} ({st['wall_p10']:.2f}-{st['wall_p90']:.2f}) cpu {st['cpu_ratio']:.3f} n={st['n']}")
    for k in names:
        print(k, "median wall", round(H.percentile(times[k]["wall"], 50), 4))
