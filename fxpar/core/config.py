"""The one place fxpar reads the environment.

    FXPAR_DUMP_DIR   write the graph after every pass into this folder
    FXPAR_CHECK      '1': run fxpar's invariant checks after every pass (the test suite sets it);
                     default off: graph.lint() still runs after every pass, and
                     fxpar.check(pm) runs the checks on demand
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Config", "from_env"]


@dataclass(frozen=True)
class Config:
    dump_dir: str | None = None
    check_invariants: bool = False


def from_env() -> Config:
    return Config(
        dump_dir=os.environ.get("FXPAR_DUMP_DIR") or None,
        check_invariants=os.environ.get("FXPAR_CHECK", "0") == "1",
    )
