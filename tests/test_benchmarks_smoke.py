"""The benchmark entry point runs end to end at tiny sizes and writes its report.

No benchmark runs in the default suite: `--quick` uses two ranks, tiny models
and one timed iteration, so this checks that every section's code path works,
not the numbers. The deterministic figures it reports are asserted in
tests/test_comm_volume.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # every section in quick mode (about 20 s): the slow run, which CI also runs
def test_quick_run_writes_every_section(tmp_path):
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert {"tp", "pp", "dp", "compile"} <= set(res)
    for m in res["tp"]["models"]:
        for name, loss in m["losses"].items():
            assert abs(loss - m["loss_ref"]) <= 1e-4 * abs(m["loss_ref"]), (m["kind"], name, loss)
        assert m["comms"]["train fxpar"]["payload"] == m["comms"]["train fxpar (own counter)"]["payload"]
    assert res["pp"]["status"] == "ok" or res["pp"]["status"].startswith(("not landed", "failed"))
    assert {"torch DDP", "torch FSDP2"} <= set(res["dp"]["comms"])
    assert [r["layers"] for r in res["compile"]["rows"]] == [1, 2]
    text = (tmp_path / "RESULTS.md").read_text()
    for heading in ("## Targets", "## 1. Tensor parallel", "## 2. Pipeline parallel", "## 3. Data parallel",
                    "## 4. Compile time", "## 5. Memory"):
        assert heading in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "results.png").stat().st_size > 10_000
