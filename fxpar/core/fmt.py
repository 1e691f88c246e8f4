"""Human-readable sizes, one definition for every report."""

from __future__ import annotations

import re

__all__ = ["fmt_bytes", "fmt_flops", "natural_key"]


def fmt_bytes(n: float, digits: int = 2) -> str:
    """1536 -> '1.50 KiB' (`digits` after the point); whole bytes below 1 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n} B"


def fmt_flops(n: float) -> str:
    """2.5e9 -> '2.5 GFLOP'."""
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000 or unit == "P":
            return f"{n:.3g} {unit}FLOP"
        n /= 1000
    return f"{n} FLOP"


def natural_key(text: str) -> tuple:
    """Sort key that orders numbers by value: 'layers.2' before 'layers.10'."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))
