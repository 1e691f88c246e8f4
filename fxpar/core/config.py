"""The one place fxpar reads the environment.

    FXPAR_DUMP_DIR   write the graph after every pass into this folder
    FXPAR_CHECK      '1': run fxpar's invariant checks after every pass (the test suite sets it);
                     default off: graph.lint() still runs after every pass, and
                     fxpar.check(pm) runs the checks on demand
    FXPAR_WAIT_SPIN_MS  how long an eager collective on a gloo group polls before it sleeps
                     (fxpar.ops.waiting; default 0: never poll; 10 is a usual bound)
    LOCAL_WORLD_SIZE the ranks on this host (torchrun sets it; fxpar.ops.waiting polls only when
                     they are no more than the cores)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["Config", "from_env", "WAIT_SPIN_ENV", "wait_spin_ms", "local_world_size"]

WAIT_SPIN_ENV = "FXPAR_WAIT_SPIN_MS"
_DEFAULT_WAIT_SPIN_MS = 0.0  # off: not measured faster on a whole step (fxpar.ops.waiting)


@dataclass(frozen=True)
class Config:
    dump_dir: str | None = None
    check_invariants: bool = False


def from_env() -> Config:
    return Config(
        dump_dir=os.environ.get("FXPAR_DUMP_DIR") or None,
        check_invariants=os.environ.get("FXPAR_CHECK", "0") == "1",
    )


def wait_spin_ms() -> float:
    """`FXPAR_WAIT_SPIN_MS` (read on each call: a test or a benchmark may change it), >= 0; 0 (off) if unset or unreadable."""
    raw = os.environ.get(WAIT_SPIN_ENV)
    if not raw:
        return _DEFAULT_WAIT_SPIN_MS
    try:
        return max(float(raw), 0.0)
    except ValueError:
        return _DEFAULT_WAIT_SPIN_MS


def local_world_size() -> int | None:
    """`LOCAL_WORLD_SIZE` (set by torchrun), or None."""
    raw = os.environ.get("LOCAL_WORLD_SIZE")
    return int(raw) if raw and raw.isdigit() and int(raw) > 0 else None
