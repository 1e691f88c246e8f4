"""Placeholder."""

from __future__ import annotations


def compiled_schedule_lines(pm) -> list[str]:
    return []
