"""The pipeline example runs under torchrun (the multi-node entry point) and verifies."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("transformers")


@pytest.mark.slow  # torchrun start-up; CI's slow run covers it
def test_pipeline_gpt2_example_under_torchrun():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples/pipeline_gpt2.py"), "--pp", "2", "--layers", "2", "--steps", "2",
           "--schedule", "gpipe"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout
    assert "Pipeline: 2 stages on pp=2" in out.stdout and "cut 0->1 before 'transformer.h.1'" in out.stdout
