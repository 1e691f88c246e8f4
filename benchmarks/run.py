"""Entry point: every comparison side by side, in one invocation.

    python -m benchmarks                 # full run (about 10-15 min on 2 cores), writes benchmarks/RESULTS.md
    python -m benchmarks --quick         # tiny sizes, seconds (the smoke test); writes to a temporary folder
    python benchmarks/run.py --sections tp,compile --out /tmp/bench
    python -m benchmarks --sections compile --update   # re-measure one section, keep the others
    python -m benchmarks --report-only                 # rewrite RESULTS.md / results.png from results.json

Sections (each a module here): tp (1), pp (2), dp (3), compile (4); memory
(5) is assembled from what tp and dp measured; overlap (6, issue 19) runs on
its own pool of 2 ranks: `python -m benchmarks --sections overlap --update`. Ranks are one pool of 4 gloo
processes (`fxpar.testing.RankPool`, 1 thread each) reused by every section;
compile time runs in its own single process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.models import ModelConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("tp", "pp", "dp", "compile", "overlap")


@dataclass(frozen=True)
class Sizes:
    """Model sizes and iteration counts of one mode."""

    tp_models: tuple[ModelConfig, ...]
    pp_model: ModelConfig
    dp_model: ModelConfig
    compile_base: ModelConfig
    compile_layers: tuple[int, ...]
    opts: dict = field(default_factory=dict)


def quick_sizes() -> Sizes:
    tiny = dict(dim=64, heads=4, vocab=256, seq=16)
    return Sizes(
        tp_models=(ModelConfig("gpt2", layers=2, hidden=256, batch=2, **tiny),
                   ModelConfig("llama", layers=2, hidden=128, kv_heads=4, batch=2, **tiny)),
        pp_model=ModelConfig("llama", layers=2, hidden=128, kv_heads=4, batch=8, **tiny),
        dp_model=ModelConfig("gpt2", layers=2, hidden=256, batch=8, **tiny),
        compile_base=ModelConfig("gpt2", layers=1, hidden=256, batch=2, **tiny),
        compile_layers=(1, 2),
        # Two ranks and one timed iteration: the smoke test checks that every path runs, not the numbers.
        opts={"warmup": 0, "iters": 1, "fwd_iters": 1, "dp_iters": 1, "microbatches": 4, "sleep_s": 0.002,
              "sleep_iters": 1, "timeout": 300, "world": 2, "compile_repeats": {}, "check_layers": [2],
              "profile_layers": None, "compile_warmup": False, "schedules": ("1f1b",)},
    )


def full_sizes() -> Sizes:
    # Sized so that one training step takes about a second on this 2-core machine with 4 ranks.
    return Sizes(
        tp_models=(ModelConfig("gpt2", layers=6, dim=512, heads=8, hidden=2048, vocab=8192, batch=4, seq=128),
                   ModelConfig("llama", layers=4, dim=512, heads=8, kv_heads=4, hidden=1408, vocab=8192, batch=4,
                               seq=128)),
        pp_model=ModelConfig("llama", layers=8, dim=512, heads=8, kv_heads=4, hidden=1408, vocab=8192, batch=8,
                             seq=128),
        dp_model=ModelConfig("gpt2", layers=4, dim=512, heads=8, hidden=2048, vocab=8192, batch=8, seq=128),
        compile_base=ModelConfig("gpt2", layers=1, dim=64, heads=4, hidden=256, vocab=512, batch=2, seq=16),
        compile_layers=(8, 32, 128),
        opts={"warmup": 2, "iters": 8, "fwd_iters": 10, "pp_iters": 6, "dp_iters": 6, "microbatches": 8,
              "sleep_s": 0.025, "sleep_iters": 8, "timeout": 1200, "world": 4,
              "compile_repeats": {8: 3, 32: 3, 128: 2}, "check_layers": [8, 32], "profile_layers": 32},
    )


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        ram = float("nan")
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram}


def _git() -> str:
    """The commit measured, and whether the working tree differed from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}" + (f" plus uncommitted changes to {len(dirty.splitlines())} files" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _load() -> str:
    try:
        return " / ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few iterations (seconds)")
    parser.add_argument("--sections", default=None, help=f"comma-separated subset of {SECTIONS} (default: all; "
                                                          "--quick leaves out overlap, minutes of inductor compiles)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/ for a full run, "
                                                     "a temporary folder for --quick)")
    parser.add_argument("--iters", type=int, default=None, help="override the timed iterations per comparison")
    parser.add_argument("--overlap-parts", default="fsdp,tp", help="the overlap section's parts: fsdp, tp or both")
    parser.add_argument("--update", action="store_true",
                        help="keep the other sections of the results.json already in --out; re-measure only these")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite RESULTS.md and results.png from the results.json in --out")
    args = parser.parse_args(argv)
    default = [s for s in SECTIONS if not (args.quick and s == "overlap")]
    sections = [s for s in args.sections.split(",") if s] if args.sections else default
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    sizes = quick_sizes() if args.quick else full_sizes()
    opts = dict(sizes.opts)
    if args.iters:
        opts.update(iters=args.iters, fwd_iters=args.iters, pp_iters=args.iters, dp_iters=args.iters,
                    sleep_iters=args.iters)
    opts["overlap_parts"] = tuple(p for p in args.overlap_parts.split(",") if p)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="fxpar-bench-")) if args.quick
                                           else ROOT / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        from benchmarks import report

        res = json.loads((out / "results.json").read_text())
        report.write_markdown(res, out / "RESULTS.md")
        report.write_plot(res, out / "results.png")
        print(f"rewrote {out / 'RESULTS.md'} and {out / 'results.png'} from {out / 'results.json'}")
        return 0

    from importlib.metadata import PackageNotFoundError, version

    import torch

    from fxpar.testing import RankPool

    try:
        transformers_version = version("transformers")  # not imported: that alone takes seconds
    except PackageNotFoundError:
        transformers_version = "not installed"

    cmd = "python -m benchmarks" + ("" if argv is None else "") + " " + " ".join(sys.argv[1:] if argv is None else argv)
    res: dict = {"meta": {"command": cmd.strip(), "mode": "quick" if args.quick else "full",
                          "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_before": _load(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers_version, "git": _git(), "ranks": opts["world"],
                          **_machine()}}
    previous = out / "results.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("meta", {}).get("mode") != res["meta"]["mode"]:
            parser.error(f"--update: {previous} holds a {old.get('meta', {}).get('mode')} run, this is "
                         f"{res['meta']['mode']}")
        for key in SECTIONS:
            if key not in sections and key in old:
                res[key] = old[key]
    t0 = time.perf_counter()

    def stamp(key: str, load_before: str) -> None:
        # Which run measured a section: kept with it, so --update can say which numbers are older.
        res[key]["run"] = {"date": res["meta"]["date"], "command": res["meta"]["command"], "git": res["meta"]["git"],
                           "load": f"{load_before} before, {_load()} after"}

    if {"tp", "pp", "dp"} & set(sections):
        with RankPool(opts["world"], timeout=opts["timeout"], threads_per_rank=1) as pool:
            if "tp" in sections:
                from benchmarks import tp

                load = _load()
                res["tp"] = tp.run(pool, list(sizes.tp_models), opts)
                stamp("tp", load)
            if "pp" in sections:
                from benchmarks import pp

                load = _load()
                res["pp"] = pp.run(pool, sizes.pp_model, opts)
                stamp("pp", load)
            if "dp" in sections:
                from benchmarks import dp

                load = _load()
                res["dp"] = dp.run(pool, sizes.dp_model, opts)
                stamp("dp", load)
    if "overlap" in sections:
        from benchmarks import overlap

        load = _load()
        with RankPool(2, timeout=opts["timeout"], threads_per_rank=1) as pool:
            res["overlap"] = overlap.run(pool, overlap.QUICK if args.quick else overlap.CONFIG, opts)
        stamp("overlap", load)
    if "compile" in sections:
        from benchmarks import compile_time

        load = _load()
        res["compile"] = compile_time.run(sizes.compile_base, list(sizes.compile_layers), opts)
        stamp("compile", load)
    res["meta"]["duration_s"] = time.perf_counter() - t0
    res["meta"]["load_after"] = _load()
    from benchmarks import report

    res["notes"] = report.notes(res)

    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    report.write_markdown(res, out / "RESULTS.md")
    plotted = report.write_plot(res, out / "results.png")
    print(f"\nwrote {out / 'RESULTS.md'}, {out / 'results.json'}"
          + (f", {out / 'results.png'}" if plotted else " (no plot: pip install -e '.[bench]' for matplotlib)"))
    print("\n".join(f"  {t}: {m} (target {thr}) {'' if met else '<- not met' if met is False else ''}"
                    for t, thr, m, met in report.targets(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
