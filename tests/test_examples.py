"""Every example runs end to end and reports success."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_tp_mlp_demo_verifies():
    out = subprocess.run([sys.executable, str(ROOT / "examples/tp_mlp_demo.py"), "--tp", "2", "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "fwd all_reduce(tp, n=2)" in out.stdout


def test_gpt2_demo_verifies():
    out = subprocess.run([sys.executable, str(ROOT / "examples/gpt2_demo.py"), "--steps", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "VERIFIED" in out.stdout and "Fallbacks (ops without a sharding rule, run replicated): 0" in out.stdout
