"""The one place fxpar reads the environment.

    FXPAR_DUMP_DIR   write the graph after every pass into this folder
    FXPAR_CHECK      '1': run invariant checks after every pass (tests set it; default on)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Config", "from_env"]


@dataclass(frozen=True)
class Config:
    dump_dir: str | None = None
    check_invariants: bool = True


def from_env() -> Config:
    return Config(
        dump_dir=os.environ.get("FXPAR_DUMP_DIR") or None,
        check_invariants=os.environ.get("FXPAR_CHECK", "1") != "0",
    )
