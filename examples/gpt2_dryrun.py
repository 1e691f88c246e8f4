"""Demo: plan GPT-2 (124M) for 256 ranks on a laptop, with no cluster and no weights.

The model is built on the meta device (no memory, no values), and fxpar runs
the same passes parallelize would run, for rank 0 of a dp=8 x pp=4 x tp=8
mesh, without a process group. It prints explain() (placements, collectives
with bytes, memory per rank, stages and the pipeline bubble), draws the
pictures, saves the resolved plan as JSON, and checks that the saved plan
rewrites the model into the same graph again.

    python examples/gpt2_dryrun.py                        # dp=8, pp=4, tp=8
    python examples/gpt2_dryrun.py --mesh tp=4 --out out  # any mesh; pictures into out/

The factories below also serve the command line:

    fxpar explain examples/gpt2_dryrun.py:gpt2_small --mesh dp=8,pp=4,tp=8
    fxpar verify  examples/gpt2_dryrun.py:gpt2_tiny  --mesh tp=2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxpar
from fxpar import viz

SEQ = 128


def gpt2_small():
    """GPT-2 small (12 layers, 768 wide, 12 heads, 50257 tokens) on the meta device, with meta token ids."""
    import transformers as T

    config = T.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, use_cache=False)
    with torch.device("meta"):
        model = T.GPT2LMHeadModel(config)
    ids = torch.zeros(32, SEQ, dtype=torch.long, device="meta")  # 32 = dp 8 x 4 microbatches
    return model, (ids,)


def gpt2_tiny():
    """A 2-layer GPT-2 with real (random) weights, small enough to verify on local CPU ranks."""
    import transformers as T

    config = T.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64, use_cache=False,
                          bos_token_id=0, eos_token_id=0)
    model = T.GPT2LMHeadModel(config).eval()  # dropout off: the comparison is exact
    return model, (torch.randint(0, 128, (4, 16)),)


def graph_codes(report) -> list[str]:
    """The code of every graph of a compiled module (each pipeline stage's too)."""
    from fxpar.core.stages import stage_info

    gm = report.graph_module
    split = stage_info(gm)
    stages = [gm.get_submodule(f"stage_{k}").code for k in range(split.num_stages)] if split else []
    return [gm.code, *stages]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="dp=8,pp=4,tp=8")
    parser.add_argument("--out", default=None, help="folder for the plan and the pictures (default: a temp dir)")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="fxpar_gpt2_"))
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    model, inputs = gpt2_small()
    report = fxpar.plan(model, args.mesh, example_inputs=inputs)
    print(report.explain())
    print(f"\nplanned {report.world_size} ranks in {time.perf_counter() - start:.1f} s")

    plan_path = fxpar.save_plan(report.plan, out / "gpt2.plan.json")
    viz.memory_chart(report, out / "memory.png", capacity_bytes=None)
    if report.mesh.size("pp") > 1:
        viz.schedule_chart(report, out / "schedule.png")
    viz.graph_svg(report, out / "graph.svg")
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")

    # The saved plan is the whole plan: it rewrites the same model into the same graph.
    again = fxpar.plan(model, args.mesh, example_inputs=inputs, plan=fxpar.load_plan(plan_path, model=model))
    if graph_codes(again) != graph_codes(report):
        print("PLAN ROUND-TRIP FAILED: the saved plan compiles to another graph")
        return 1
    print("PLAN ROUND-TRIP OK: the saved plan compiles to the same graph")
    return 0


if __name__ == "__main__":
    sys.exit(main())
