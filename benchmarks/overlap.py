"""Section 6: overlap (issue 19) -- fxpar fsdp vs torch FSDP2, fxpar tp vs DTensor, eager and compiled.

One GPT of 4 blocks (d=256, 8 x 128 tokens) on 2 gloo ranks, every side in the
same rank processes, interleaved iteration by iteration (`harness.interleave`):

    fsdp   fxpar fsdp (overlap=True, the default), fxpar fsdp (overlap=False: every gather
           and reduce-scatter waited where issued), torch FSDP2 (fully_shard per block, then
           the root), fxpar fsdp compile=True (inductor; each block's gather and reduce-scatter
           functional collectives in the compiled graph), torch FSDP2 compiled (torchtitan's
           way: each block torch.compile'd, then fully_shard; FSDP2's collectives stay eager
           hooks around the compiled blocks); a training step (forward + backward) on each
           rank's half of the batch
    tp     fxpar tp eager, torch DTensor eager (the megatron plan, `models.torch_tp_plan`),
           fxpar tp compile=True (inductor), torch.compile of the DTensor model (inductor);
           a training step and a forward (no_grad)
    fxpar tp / fsdp (polled waits): the same module with FXPAR_WAIT_SPIN_MS=10, its eager
           collectives polling their Work before they sleep (`fxpar.ops.waiting`; off by default)

Memory per side: the peak resident set of the rank over one training step minus
its resident set before (Linux's VmHWM, reset through /proc/self/clear_refs),
best of two; and for fxpar the peak bytes of gathered FSDP parameters alive at
once, counted from the tensors.

Rerun just this section (about 5 minutes on 2 idle cores; inductor compiles are most of it):

    python -m benchmarks --sections overlap --update
    python -m benchmarks --sections overlap --overlap-parts fsdp --iters 20 --out /tmp/fsdp   # fsdp rows only
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any

import torch
import torch.distributed as dist

from benchmarks import harness as H
from benchmarks.dp import _torch_fsdp2
from benchmarks.models import ModelConfig, batch, build, cross_entropy, torch_tp_plan

CONFIG = ModelConfig("gpt2", layers=4, dim=256, heads=8, hidden=1024, vocab=1024, batch=8, seq=128)
QUICK = ModelConfig("gpt2", layers=2, dim=64, heads=4, hidden=256, vocab=256, batch=4, seq=16)

FSDP_SIDES = ("fxpar fsdp", "fxpar fsdp (no overlap)", "torch FSDP2", "fxpar fsdp compiled", "torch FSDP2 compiled")
TP_SIDES = ("fxpar tp", "torch DTensor", "fxpar tp compiled", "torch DTensor compiled")
PAIRS = {
    "fsdp": [("fxpar fsdp", "torch FSDP2"), ("fxpar fsdp (polled waits)", "fxpar fsdp"),
             ("fxpar fsdp (no overlap)", "torch FSDP2"),
             ("fxpar fsdp", "fxpar fsdp (no overlap)"), ("fxpar fsdp compiled", "torch FSDP2"),
             ("fxpar fsdp compiled", "torch FSDP2 compiled"), ("fxpar fsdp compiled", "fxpar fsdp")],
    "tp train": [("fxpar tp", "torch DTensor"), ("fxpar tp (polled waits)", "fxpar tp"),
                 ("fxpar tp compiled", "torch DTensor compiled"),
                 ("fxpar tp compiled", "fxpar tp")],
    "tp forward": [("fxpar tp", "torch DTensor"), ("fxpar tp (polled waits)", "fxpar tp"),
                   ("fxpar tp compiled", "torch DTensor compiled")],
}
TARGETS = [("fsdp", "fxpar fsdp", "torch FSDP2", 0.85), ("tp train", "fxpar tp compiled", "torch DTensor compiled", 0.90),
           ("tp forward", "fxpar tp", "torch DTensor", 0.80)]


def _polled(run):
    """`run` with fxpar's eager collectives polling their Work before they sleep (`FXPAR_WAIT_SPIN_MS=10`,
    `fxpar.ops.waiting`; off by default): the A/B of the polled waits, in the same processes."""
    from fxpar.core.config import WAIT_SPIN_ENV

    def go():
        before = os.environ.get(WAIT_SPIN_ENV)
        os.environ[WAIT_SPIN_ENV] = "10"
        try:
            return run()
        finally:
            if before is None:
                os.environ.pop(WAIT_SPIN_ENV, None)
            else:
                os.environ[WAIT_SPIN_ENV] = before
    return go


def _rss_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_rss_bytes(step) -> int:
    """Peak resident bytes above the starting point while `step()` runs (best of two runs)."""
    best = None
    for _ in range(2):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
        except OSError:
            return -1
        before = _rss_kib("VmRSS:")
        step()
        grew = (_rss_kib("VmHWM:") - before) * 1024
        best = grew if best is None else min(best, grew)
    return best


def overlap_rank(cfg: ModelConfig, opts: dict) -> dict:
    """Rank body (every rank runs it): the parts in opts['overlap_parts'] (default both)."""
    n, rank = dist.get_world_size(), dist.get_rank()
    model = build(cfg)
    ids, target = batch(cfg)
    local_ids, local_target = ids.chunk(n)[rank], target.chunk(n)[rank]
    out: dict[str, Any] = {"losses": {}, "memory": {}, "setup_s": {}, "times": {}}
    with torch.no_grad():
        out["loss_ref"] = cross_entropy(model(ids), target).item()

    parts = opts.get("overlap_parts") or ("fsdp", "tp")
    if "fsdp" in parts:
        _fsdp_sides(out, model, local_ids, local_target, opts)
    if "tp" in parts:
        _tp_sides(out, model, ids, target, opts)
    return out


def _fsdp_sides(out: dict, model, local_ids, local_target, opts: dict) -> None:
    import fxpar
    from fxpar.runtime.fsdp_state import gathered_param_bytes, peak_gathered_bytes, reset_peak_gathered_bytes
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("fsdp",))
    sides: dict[str, tuple] = {}
    for name, overlap, compiled in (("fxpar fsdp", True, False), ("fxpar fsdp (no overlap)", False, False),
                                    ("fxpar fsdp compiled", True, True)):
        t0 = time.perf_counter()
        pm = fxpar.parallelize(model, mesh, example_inputs=(local_ids,), input_layout="local", overlap=overlap,
                               compile=compiled)
        out["setup_s"][name] = time.perf_counter() - t0
        step = (lambda p: lambda: p.step(local_ids, target=local_target, loss_fn=cross_entropy))(pm)
        sides[name] = (step, pm)
    for name, fsdp2 in (("torch FSDP2", _torch_fsdp2(model, mesh)),
                        ("torch FSDP2 compiled", _torch_fsdp2_compiled(model, mesh))):
        sides[name] = ((lambda m: lambda: cross_entropy(m(local_ids), local_target).backward())(fsdp2), fsdp2)
    sides = {name: sides[name] for name in FSDP_SIDES}  # the harness's order: "fxpar fsdp" first (noise row)
    for name, (step, m) in sides.items():
        t0 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        r = step()
        out["losses"][name] = float(r) if r is not None and name.startswith("fxpar") else None
        out["setup_s"][name] = out["setup_s"].get(name, 0.0) + time.perf_counter() - t0  # compiles on first step
        m.zero_grad(set_to_none=True)
        eager = name.startswith("fxpar") and "compiled" not in name
        if eager:
            reset_peak_gathered_bytes()
            base = gathered_param_bytes()
        rss = peak_rss_bytes(step)
        m.zero_grad(set_to_none=True)
        if "compiled" in name:  # a dispatch mode does not see inside compiled kernels: RSS only
            out["memory"][name] = {"peak_rss": rss, "peak_live": None}
            continue
        with H.StepLiveBytes(H.fsdp_bucket_tensors(m) if eager else None) as live:
            step()
        out["memory"][name] = {"peak_rss": rss, "peak_live": live.peak}
        if eager:
            out["memory"][name]["gathered_params_peak"] = peak_gathered_bytes() - base
    if any(name.startswith("fxpar") for name in sides):
        out["explain_overlap"] = [ln for ln in sides["fxpar fsdp"][1].explain().splitlines()
                                  if ln.startswith(("  all_gather(", "  backward (the dual", "  gathered parameters in flight"))]
    variants = [H.Variant(name, step, (lambda mm: lambda: mm.zero_grad(set_to_none=True))(m))
                for name, (step, m) in sides.items()]
    variants.append(H.Variant("fxpar fsdp (polled waits)", _polled(variants[0].run), variants[0].prepare))
    variants.append(H.Variant("fxpar fsdp (again)", variants[0].run, variants[0].prepare))
    out["times"]["fsdp"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["iters"])


def _torch_fsdp2_compiled(model, mesh):
    """FSDP2 under torch.compile as torchtitan applies it: each block compiled (inductor), then fully_shard
    per block and the root; FSDP2's gathers and reduce-scatters run as eager hooks around the compiled blocks."""
    from torch.distributed.fsdp import fully_shard

    m = copy.deepcopy(model)
    for i, block in enumerate(m.h):
        m.h[i] = torch.compile(block)
    for block in m.h:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def _tp_sides(out: dict, model, ids, target, opts: dict) -> None:
    import fxpar
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    models: dict[str, Any] = {}
    for name, backend in (("fxpar tp", False), ("fxpar tp compiled", True)):
        t0 = time.perf_counter()
        models[name] = fxpar.parallelize(model, mesh, example_inputs=(ids,), compile=backend)
        out["setup_s"][name] = time.perf_counter() - t0
    dt = torch_tp_plan(copy.deepcopy(model), mesh, style="megatron")
    models["torch DTensor"] = dt
    models["torch DTensor compiled"] = torch.compile(torch_tp_plan(copy.deepcopy(model), mesh, style="megatron"))

    def train(name, m):
        if name.startswith("fxpar"):
            return lambda: m.step(ids, target=target, loss_fn=cross_entropy)
        return lambda: cross_entropy(m(ids), target).backward()

    def fwd(m):
        def go():
            with torch.no_grad():
                m(ids)
        return go

    for name, m in models.items():  # compiles (train and no_grad graphs) before timing; loss check
        t0 = time.perf_counter()
        m.zero_grad(set_to_none=True)
        train(name, m)()
        with torch.no_grad():
            out["losses"][name] = cross_entropy(m(ids), target).item()
        out["setup_s"][name] = out["setup_s"].get(name, 0.0) + time.perf_counter() - t0
    variants = [H.Variant(name, train(name, m), (lambda mm: lambda: mm.zero_grad(set_to_none=True))(m))
                for name, m in models.items()]
    variants.append(H.Variant("fxpar tp (polled waits)", _polled(variants[0].run), variants[0].prepare))
    variants.append(H.Variant("fxpar tp (again)", variants[0].run, variants[0].prepare))
    out["times"]["tp train"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["iters"])
    variants = [H.Variant(name, fwd(m)) for name, m in models.items()]
    variants.append(H.Variant("fxpar tp (polled waits)", _polled(variants[0].run)))
    variants.append(H.Variant("fxpar tp (again)", variants[0].run))
    out["times"]["tp forward"] = H.interleave(variants, warmup=opts["warmup"], iters=opts["fwd_iters"])


def run(pool: Any, cfg: ModelConfig, opts: dict) -> dict:
    """Runs the section on the pool's ranks; returns its results (JSON-ready)."""
    print(f"[overlap] {cfg.describe()} on {pool.world_size} ranks ...", flush=True)
    t0 = time.perf_counter()
    ranks = pool.run(overlap_rank, cfg, opts, timeout=opts["timeout"])
    r0 = ranks[0]
    section: dict[str, Any] = {"title": "Overlap (issue 19)", "ranks": pool.world_size, "config": cfg.describe(),
                               "loss_ref": r0["loss_ref"], "losses": r0["losses"], "setup_s": r0["setup_s"],
                               "memory": [r["memory"] for r in ranks], "explain": r0.get("explain_overlap", []),
                               "compare": {}, "noise": {}, "medians": {}}
    for what in r0["times"]:
        times = H.aggregate([r["times"][what] for r in ranks])
        names = list(times)
        section["noise"][what] = H.pair_stats(times, names[0], names[-1])
        section["medians"][what] = {name: H.percentile(times[name]["wall"], 50) for name in names}
        for a, b in PAIRS[what]:
            section["compare"][f"{what}: {a} / {b}"] = H.pair_stats(times, a, b)
    section["seconds"] = time.perf_counter() - t0
    print(f"[overlap] done in {section['seconds']:.0f}s", flush=True)
    return section


def targets(sec: dict) -> list[tuple[str, str, str, bool | None]]:
    out = []
    for what, a, b, thr in TARGETS:
        st = sec["compare"].get(f"{what}: {a} / {b}")
        med = st.get("wall_ratio") if st else None
        noise = sec["noise"].get(what, {})
        shown = "not measured" if med is None else (
            f"{med:.3f} ({st['wall_p10']:.2f}-{st['wall_p90']:.2f}; A vs A {noise.get('wall_p10', 0):.2f}-"
            f"{noise.get('wall_p90', 0):.2f})")
        out.append((f"Overlap {what}: {a} / {b} (wall)", f"<= {thr}", shown, None if med is None else med <= thr))
    return out


def lines(sec: dict) -> list[str]:
    """The section of RESULTS.md."""
    def r(x):
        return "-" if x is None else f"{x:.3f}"

    out = ["", f"## 6. Overlap (issue 19): fxpar fsdp vs FSDP2, fxpar tp vs DTensor, eager and compiled",
           "", f"{sec['config']}; {sec['ranks']} gloo ranks; fsdp sides take each rank's half of the batch. "
           f"Rerun: `python -m benchmarks --sections overlap --update`. "
           f"Measured {sec.get('run', {}).get('date', '?')}, load {sec.get('run', {}).get('load', '?')}.", "",
           "| comparison | ratio (wall, median) | 10th-90th | CPU ratio | pairs |", "|---|---|---|---|---|"]
    for key, st in sec["compare"].items():
        out.append(f"| {key} | {r(st.get('wall_ratio'))} | {r(st.get('wall_p10'))}-{r(st.get('wall_p90'))} | "
                   f"{r(st.get('cpu_ratio'))} | {st.get('n', '')} |")
    for what, st in sec["noise"].items():
        out.append(f"| {what}: noise (A vs A) | {r(st.get('wall_ratio'))} | {r(st.get('wall_p10'))}-"
                   f"{r(st.get('wall_p90'))} | {r(st.get('cpu_ratio'))} | {st.get('n', '')} |")
    out += ["", "Median step times (s, slowest rank): " + "; ".join(
        f"{what}: " + ", ".join(f"{k} {v:.3f}" for k, v in med.items()) for what, med in sec["medians"].items())]
    out += ["", "Losses: " + ", ".join(f"{k} {v:.6f}" for k, v in sec["losses"].items() if v is not None)
            + f" (unsplit {sec['loss_ref']:.6f})"]
    mem = sec["memory"][0]
    out += ["", "Memory on rank 0 over one training step: peak bytes of tensors created in the step (activations, "
                "gathered parameters, buffers in flight, gradients; sampled after every op, `harness.StepLiveBytes`), the "
                "peak resident set above the start (VmHWM; allocator-dependent, a rough check), and for fxpar "
                "the gathered parameters handed to the graph:", "",
            "| side | peak tensor bytes | peak RSS growth | gathered parameters peak |", "|---|---|---|---|"]
    for name, m in mem.items():
        g = m.get("gathered_params_peak")
        live = m.get("peak_live")
        out.append(f"| {name} | {'-' if live is None else f'{live / 2**20:.1f} MiB'} | {m['peak_rss'] / 2**20:.1f} MiB | "
                   f"{'-' if g is None else f'{g / 2**20:.2f} MiB'} |")
    if sec.get("explain"):
        out += ["", "What overlaps what (fxpar fsdp's explain()):", "", "```", *sec["explain"], "```"]
    return out
