"""Testing utilities: a multi-rank gloo harness (and, later, hypothesis strategies)."""

from fxpar.testing.dist import RankError, RankPool, rank_pool, run_ranks

__all__ = ["RankError", "RankPool", "rank_pool", "run_ranks"]
