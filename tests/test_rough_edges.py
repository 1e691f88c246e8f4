"""Rough edges found by trying fxpar as a new user would (issue 14): each now says what it means."""

from __future__ import annotations

import json
import os
import re
import signal
import sys

import pytest
import torch
import torch.nn as nn

import fxpar
from fxpar.testing import RankError, run_ranks
from fxpar.verify.report import _compare
from tests.models import tiny_gpt2


@pytest.fixture(scope="module")
def pipelined_report():
    with torch.device("meta"):
        model = tiny_gpt2(12, 32)
    ids = torch.zeros(8, 16, dtype=torch.long, device="meta")
    return fxpar.plan(model, {"dp": 2, "pp": 2, "tp": 2}, example_inputs=(ids,))


def test_explain_names_the_whole_mesh_each_module_once_in_numeric_order(pipelined_report):
    text = pipelined_report.explain()
    assert "fxpar plan for GPT2LMHeadModel on mesh (dp=2, pp=2, tp=2)" in text
    params = text[text.index("Parameters ("):text.index("Collectives (")]
    (lm_head,) = [line for line in params.splitlines() if line.strip().startswith("lm_head:")]
    assert lm_head.count("weight") == 1  # tied and held by two stages: one parameter
    modules = [line.split(":")[0].strip() for line in text.splitlines() if line.startswith("  transformer.h.")]
    blocks = [int(m.split(".")[2]) for m in modules if m.endswith(".attn.c_attn")]
    assert blocks == sorted(blocks) == list(range(12))  # h.2 before h.10
    assert "<root>: none" not in text


def test_pipeline_formulas_name_the_inputs_not_raw_symbols(pipelined_report):
    text = pipelined_report.explain()
    stages = text[text.index("Pipeline:"):]
    assert "input_ids.size(0)" in stages
    assert not re.search(r"\bs\d+\b", stages), stages


def test_a_zero_reference_is_compared_absolutely():
    want = torch.zeros(4)
    got = torch.full((4,), 1e-9)
    r = _compare("grad w", got, want, None, None)
    assert r.ok and r.max_rel < 1.0  # not "ok" beside a relative error of 1e0 or more
    bad = _compare("grad w", torch.ones(4), want, None, None)
    assert not bad.ok and bad.max_rel > 1.0


def test_plan_fields_are_validated():
    with pytest.raises(fxpar.PlanError, match="auto_tp"):
        fxpar.Plan(auto_tp="false")
    with pytest.raises(fxpar.PlanError, match="microbatches"):
        fxpar.Plan(microbatches=10 ** 18)


def test_a_saved_plan_with_a_string_flag_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    fxpar.save_plan(fxpar.Plan(auto_tp=True), path)
    data = json.loads(path.read_text())
    data["auto_tp"] = "false"
    path.write_text(json.dumps(data))
    with pytest.raises(fxpar.PlanError, match="auto_tp"):
        fxpar.load_plan(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written through a temporary, renamed


class _TakesX(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_missing_example_inputs_are_named():
    with pytest.raises(fxpar.CaptureError, match=r"missing a required argument: 'x'.*example_inputs=\(x,\)"):
        fxpar.plan(_TakesX(), {"dp": 2})


def test_a_one_dimensional_input_plans():
    report = fxpar.plan(_TakesX(), {"dp": 2}, example_inputs=(torch.randn(4),))
    assert "fxpar plan" in report.explain()


def test_the_command_line_does_not_put_the_working_directory_first(tmp_path, monkeypatch):
    from fxpar.cli import _import_module

    (tmp_path / "my_factory_mod.py").write_text("X = 1\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert _import_module("my_factory_mod").X == 1
    assert sys.path[0] != str(tmp_path) and sys.path[-1] == str(tmp_path)


def _die_on_rank_1():
    if torch.distributed.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return "ok"


def test_a_rank_killed_by_a_signal_is_named_as_such():
    with pytest.raises(RankError, match="rank 1 process was killed by signal SIGKILL"):
        run_ranks(_die_on_rank_1, 2, timeout=60)
