"""`python -m fxpar.launch SCRIPT [ARGS]`: run a script as `python SCRIPT ARGS` would, recording a failure.

`fxpar run` starts every rank through this module under torchrun. An exception that ends the script
is written to torchrun's per-rank error file (torch.distributed.elastic's `record`), so the launcher
can name the rank that failed first and its exception, rather than only the ranks torchrun stopped
after it.
"""

from __future__ import annotations

import os
import runpy
import sys

from torch.distributed.elastic.multiprocessing.errors import record

__all__ = ["main"]


@record
def _run(script: str) -> None:
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m fxpar.launch SCRIPT [ARGS...]")
    sys.argv = argv
    sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` puts the script's folder first
    _run(argv[0])


if __name__ == "__main__":
    main()
