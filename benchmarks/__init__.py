"""fxpar's benchmarks: each comparison side by side with torch's own implementation, in one run.

    python -m benchmarks            # full run, writes benchmarks/RESULTS.md and results.png
    python -m benchmarks --quick    # tiny sizes (the smoke test)

Modules: `run` (entry point and sizes), `harness` (interleaved timing, byte
counting, memory), `models` (the benchmark models, torch's hand-written plans,
the analytical volumes), one module per section (`tp`, `pp`, `dp`,
`compile_time`), `report` (RESULTS.md and the plot).
"""
