"""Collectives as custom ops with their gradient duals (`fxpar.ops.collectives`), the only code that
creates communication nodes."""
