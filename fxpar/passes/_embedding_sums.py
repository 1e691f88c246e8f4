"""Embedding sums: lookups added together before anything else reads them (not a pass).

GPT-2's `wte(ids) + wpe(pos)`, BERT's `word + token_type + position`: every table in such a sum
can be vocab (row) parallel at no extra cost. Each sharded lookup is Partial on tp; a Partial
plus a Partial is Partial, so the sum is reduced once, at its root, as the token embedding alone
would be (`propagate_sharding._reduce_lookup`). Sharding a position table therefore divides it by
tp without adding a collective.

    %e0 = embedding(wte, ids)        P
    %e1 = embedding(wpe, pos)        P
    %s  = add(%e0, to(%e1))          P    <- the root: all_reduce (or reduce_scatter under SP) here
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxpar.rules.embedding import vocab_parallel_embedding

aten = torch.ops.aten

LOOKUPS = (aten.embedding.default, vocab_parallel_embedding._opoverload)
# same-dtype conversions between a lookup and the add (GPT-2's `.to(inputs_embeds.device)`)
_PASS = (aten.to.dtype_layout, aten.to.device, aten.to.dtype, aten._to_copy.default)


def _tensor_users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if isinstance(u.meta.get("val"), torch.Tensor)]


def _same_dtype(node: fx.Node) -> bool:
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return src is not None and src.dtype == node.meta["val"].dtype


def _through(node: fx.Node) -> fx.Node:
    """`node` followed up through its single-user same-dtype conversions."""
    while True:
        users = _tensor_users(node)
        if len(users) != 1 or users[0].target not in _PASS or not _same_dtype(users[0]):
            return node
        node = users[0]


def _source(node: fx.Node) -> fx.Node:
    """`node` followed down through same-dtype conversions."""
    while node.op == "call_function" and node.target in _PASS and _same_dtype(node):
        node = node.args[0]
    return node


def is_sum(node: fx.Node) -> bool:
    """A lookup of a table (a get_attr weight), or an add of two such sums."""
    node = _source(node)
    if node.op != "call_function":
        return False
    if node.target in LOOKUPS:
        return isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
    if node.target == aten.add.Tensor and len(node.args) == 2 and not node.kwargs.get("alpha"):
        return all(isinstance(a, fx.Node) and is_sum(a) for a in node.args)
    return False


def sum_root(lookup: fx.Node) -> fx.Node:
    """The last add of the embedding sum `lookup` takes part in (`lookup` itself if none)."""
    node = lookup
    while True:
        top = _through(node)
        users = _tensor_users(top)
        if len(users) != 1 or users[0].target != aten.add.Tensor or not is_sum(users[0]):
            return node
        node = users[0]


def leaves(root: fx.Node) -> list[fx.Node]:
    """The lookups summed at `root`."""
    node = _source(root)
    if node.target in LOOKUPS:
        return [node]
    return [x for a in node.args for x in leaves(a)]


def partner_tables(token_lookup: fx.Node) -> list[fx.Node]:
    """The other tables (get_attr nodes) whose lookups are summed with `token_lookup`."""
    root = sum_root(token_lookup)
    if root is token_lookup:
        return []
    out = []
    for leaf in leaves(root):
        weight = leaf.args[0]
        if leaf is not token_lookup and weight is not token_lookup.args[0] and weight not in out:
            out.append(weight)
    return out
