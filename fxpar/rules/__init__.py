"""Sharding rules per op family, in one table (`fxpar.rules.registry`).

Importing this package registers every family: attention, conv, dropout,
embedding, indexing, loss, matmul, moe, norms, pointwise, reductions, views. A new op
gets its rule in the family module it belongs to, registered with
`@register(op, ...)`, and a test in tests/rules/.
"""

from fxpar.rules.registry import (
    LocalizeFn,
    OpInfo,
    P,
    R,
    RuleFn,
    S,
    Strategy,
    all_replicate,
    allows_uneven,
    has_rule,
    lookup,
    lookup_localize,
    norm_dim,
    register,
    replace_tensor_args,
    tensor_args,
)
from fxpar.rules import (  # noqa: F401,E402  (each family registers its rules on import)
    attention,
    conv,
    dropout,
    embedding,
    indexing,
    loss,
    matmul,
    moe,
    norms,
    pointwise,
    reductions,
    views,
)

__all__ = ["OpInfo", "Strategy", "RuleFn", "LocalizeFn", "register", "lookup", "lookup_localize", "tensor_args",
           "replace_tensor_args", "has_rule", "all_replicate", "allows_uneven", "norm_dim", "P", "R", "S"]
