"""Collectives as custom ops with their gradient duals (`fxpar.ops.collectives`), the only code that
creates communication nodes, and the graph edits that insert them (`fxpar.ops.transitions`); the MoE token
exchange (`fxpar.ops.moe`)."""
