"""The README's two commands: present, and the test one is what CI runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    blocks, inside, cur = [], False, []
    for line in text.splitlines():
        if line.strip() == "```bash":
            inside, cur = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(cur).strip())
        elif inside:
            cur.append(line)
    return blocks


def test_readme_starts_with_demo_and_test_commands_and_ci_runs_the_test_one():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    demo, tests = blocks[0], blocks[1]
    assert demo.startswith("python3 -m venv") and "pip install torch==2.13.0" in demo and "examples/" in demo
    assert tests.startswith("python3 -m venv") and "pytest" in tests
    ci = [line for line in (ROOT / ".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert ci[0] == tests  # CI runs the README's test command first, then only the slow-marked tests
    assert ci[1:] == [". .venv/bin/activate && python -m pytest -q -m slow"]
