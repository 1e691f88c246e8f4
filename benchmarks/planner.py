"""The planner's choice against every mesh, timed side by side on local gloo ranks.

    python -m benchmarks.planner                 # GPT of 4 blocks (d=256, 8 x 128 tokens) on 2 and 4 ranks
    python -m benchmarks.planner --quick         # tiny sizes, seconds
    python -m benchmarks.planner --out DIR       # where PLANNER.md and planner.json go (default: benchmarks/)

For each world size W: `fxpar.autoplan(model, W, device="local")` (this machine measured) picks a
mesh; then every mesh of W ranks (dp, fsdp, pp, tp and their products) trains the same model with
AdamW, all interleaved in one run (`benchmarks.harness.interleave`: each iteration visits every
mesh, in rotating order), and the median step of the chosen mesh is compared with the fastest.
The predictions of every mesh are printed beside the measurements, so the calibration of the
'local' profile can be read off.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fxpar  # noqa: E402
from benchmarks.harness import Variant, aggregate, interleave, percentile  # noqa: E402
from benchmarks.models import ModelConfig, batch, build, cross_entropy  # noqa: E402
from fxpar.planner import estimate_module, measure_local  # noqa: E402
from fxpar.planner.search import MESH_ORDER  # noqa: E402
from fxpar.testing import RankPool  # noqa: E402

ROOT = Path(__file__).resolve().parent


def _meshes(world: int) -> list[dict]:
    out = []
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            for fsdp in (1, 2, 4):
                if world % (tp * pp * fsdp) == 0:
                    dp = world // (tp * pp * fsdp)
                    sizes = {"dp": dp, "pp": pp, "fsdp": fsdp, "tp": tp}
                    mesh = {k: sizes[k] for k in MESH_ORDER if sizes[k] > 1}
                    if mesh and mesh not in out:
                        out.append(mesh)
    return out


def _time_meshes(cfg: ModelConfig, meshes: list[dict], settings: list[dict], warmup: int, iters: int) -> dict:
    """On every rank: one ParallelModule per mesh, AdamW steps interleaved; {mesh label: [(wall, cpu)]}."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    model = build(cfg)
    ids, target = batch(cfg)
    variants = []
    for mesh, kwargs in zip(meshes, settings):
        dm = init_device_mesh("cpu", tuple(mesh.values()), mesh_dim_names=tuple(mesh))
        pm = fxpar.parallelize(model, dm, example_inputs=(ids,), **kwargs)
        opt = torch.optim.AdamW(pm.parameters(), lr=1e-4)

        def run(pm=pm, opt=opt):
            opt.zero_grad(set_to_none=True)
            pm.step(ids, target=target, loss_fn=cross_entropy)
            opt.step()

        variants.append(Variant(_label(mesh), run))
    dist.barrier()
    return interleave(variants, warmup=warmup, iters=iters)


def _label(mesh: dict) -> str:
    return " x ".join(f"{k}{v}" for k, v in mesh.items())


def run(world: int, cfg: ModelConfig, *, warmup: int, iters: int, local) -> dict:
    model = build(cfg)
    ids, _ = batch(cfg)
    ap = fxpar.autoplan(model, world, example_inputs=(ids,), device=local)
    meshes = _meshes(world)
    chosen = dict(zip(ap.mesh_dim_names, ap.mesh_shape))
    if chosen not in meshes:
        meshes.append(chosen)
    # the chosen mesh runs as autoplan says (its plan, mixed precision and checkpointing); the others as planned by default
    settings = [ap.parallelize_kwargs() if m == chosen else {"plan": None} for m in meshes]
    predicted = {}
    for m, kwargs in zip(meshes, settings):
        report = fxpar.plan(model, m, example_inputs=(ids,), plan=kwargs["plan"])
        mp = kwargs.get("mp_policy")
        predicted[_label(m)] = estimate_module(report.module, report.mesh, local,
                                               activation_checkpointing=kwargs.get("activation_checkpointing"),
                                               mp_dtype=mp.param_dtype if mp is not None else None).step_s
    with RankPool(world, timeout=1800) as pool:
        per_rank = pool.run(_time_meshes, cfg, meshes, settings, warmup, iters)
    times = aggregate(per_rank)
    medians = {k: percentile(v["wall"], 50) for k, v in times.items()}
    fastest = min(medians, key=medians.get)
    return {"world": world, "model": cfg.describe(), "chosen": _label(chosen), "fastest": fastest,
            "chosen_settings": ap.best.label, "load": os.getloadavg(),
            "ratio": medians[_label(chosen)] / medians[fastest], "measured_s": medians, "predicted_s": predicted,
            "plan_seconds": ap.seconds.get("total")}


def report(results: list[dict], local, out: Path) -> str:
    lines = ["# The planner against every mesh", "",
             "`python -m benchmarks.planner`: `fxpar.autoplan(..., device=\"local\")` picks a mesh; every mesh of the",
             "same ranks then trains the same model (AdamW steps), interleaved in one run on local gloo ranks. Ratio:",
             "the chosen mesh's median step over the fastest mesh's (target <= 1.10). How long autoplan takes on",
             "Llama-3 8B / 70B at 64 / 512 devices: PLANNER_SPEED.md (`python -m benchmarks.planner_speed`).", "",
             f"Local profile (measured): {local.flops(torch.float32) / 1e9:.1f} GFLOP/s float32 matmul, "
             f"{local.memory_bandwidth / 1e9:.1f} GB/s copy, all-reduce latency {local.intra_latency * 1e6:.0f} us, "
             f"bandwidth {local.intra_bandwidth / 1e9:.2f} GB/s.", ""]
    for r in results:
        lines += [f"## {r['world']} ranks: {r['model']}", "",
                  f"chosen **{r['chosen']}** ({r.get('chosen_settings', '')}), fastest measured **{r['fastest']}**: "
                  f"ratio **{r['ratio']:.3f}** (autoplan took {r['plan_seconds']:.1f} s; load average after the "
                  f"run {', '.join(f'{x:.1f}' for x in r.get('load', ()))} on this machine's 2 cores)", "",
                  "| mesh | measured step ms (median) | predicted ms | predicted / measured |", "|---|---|---|---|"]
        for k in sorted(r["measured_s"], key=r["measured_s"].get):
            m, p = r["measured_s"][k], r["predicted_s"].get(k, float("nan"))
            lines.append(f"| {k}{' (chosen)' if k == r['chosen'] else ''} | {m * 1e3:.1f} | {p * 1e3:.1f} | {p / m:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "PLANNER.md").write_text(text)
    (out / "planner.json").write_text(json.dumps(results, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT)
    ap.add_argument("--worlds", default="2,4")
    ns = ap.parse_args(argv)
    if ns.quick:
        cfg = ModelConfig("gpt2", layers=2, dim=64, heads=4, hidden=256, vocab=256, batch=8, seq=16)
        warmup, iters = 0, 2
    else:
        cfg = ModelConfig("gpt2", layers=4, dim=256, heads=8, hidden=1024, vocab=1024, batch=8, seq=128)
        warmup, iters = 2, 8
    local = measure_local()
    results = [run(int(w), cfg, warmup=warmup, iters=iters, local=local) for w in ns.worlds.split(",")]
    print(report(results, local, ns.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
