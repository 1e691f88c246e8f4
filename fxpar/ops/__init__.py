"""Collectives as custom ops with their gradient duals (`fxpar.ops.collectives`), the only code that
creates communication nodes, and the graph edits that insert them (`fxpar.ops.transitions`); the MoE token
exchange (`fxpar.ops.moe`); the gradient sum of grouped-query attention's replicated kv heads
(`fxpar.ops.kv_replicas`)."""

import importlib

# Registers fxpar::replica_grad_sum in COLLECTIVE_OPS / BACKWARD_OF before any module reads (or copies)
# them: every import of an fxpar.ops module runs this file first.
importlib.import_module("fxpar.ops.kv_replicas")
