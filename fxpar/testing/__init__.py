from fxpar.testing.dist import RankError, RankPool, run_ranks

__all__ = ["RankError", "RankPool", "run_ranks"]
