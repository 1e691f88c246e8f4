"""annotate_parameters: give every parameter its placements from the plan.

Requires: captured. Provides: param_placements.

Each get_attr node gets a `NodeInfo(role="param")` whose spec places it on the
mesh: on `tp`, by its module's style (explicit plan keys first, then, when the
plan is automatic, Megatron pairs found in the graph); Replicate on every
other mesh dim. How a style shards a tensor depends on how the graph uses it:

    used as                   colwise     rowwise
    linear weight [N, K]      Shard(0)    Shard(1)
    linear bias [N]           Shard(0)    Replicate
    addmm weight [K, N]       Shard(1)    Shard(0)      (HF Conv1D)
    addmm bias [N]            Shard(0)    Replicate
    conv weight [Co, Ci, *K]  Shard(0)    Shard(1)      (conv1d / conv2d / conv3d)
    conv bias [Co]            Shard(0)    Replicate
    batch_norm params [C]     Shard(0)    -             (weight, bias, running statistics)
    embedding weight [V, C]   Shard(1)    Shard(0)      (rowwise = vocab parallel)

A projection whose output is split into k equal sections (a fused qkv) is
sharded section by section: `_StridedShard(d, split_factor=k)`, so each rank
holds the same heads of q, k and v. A weight tied between an embedding and a
projection (GPT-2's wte / lm_head) takes the projection's placement.

With an automatic plan (`Plan(auto_tp=True)`, what `plan=None` means), modules
the plan does not name get styles from the graph: Megatron pairs
(`fxpar.passes._megatron.find_pairs`) whose sizes and head counts divide by tp,
and a projection feeding the graph output or a captured loss (the lm_head) column-wise, and the
token embedding, if untied, vocab parallel (rowwise: rows sharded; `propagate_sharding` reduces
its Partial output right after the lookup). Position and type tables summed with it are row
parallel too: their Partial lookups add to its Partial, reduced once (`_embedding_sums`).
A pair's projections may be convolutions (output channels colwise, input channels
rowwise); a batch norm between them is channel-local and sharded with them.

Before:  %up_weight = get_attr[target=up.weight]
After:   same node, meta["fxpar"].spec.placements == (Shard(0),), local shape [N/tp, K]

An nn.Linear's weight or bias (every use an aten.linear) whose plain sharded
dim does not divide by tp is cut unevenly, as DTensor's Shard: torch.chunk's
rows, ceil(size / tp) each, the last ranks fewer (a vocab of 50257 at tp=2:
25129 + 25128). Rules that are exact on uneven shards (`allows_uneven`:
linear, pointwise) keep them; any other op gets them gathered, padded.

Raises ShardingError when any other sharded dim does not divide by the mesh
size (fused sections, embeddings, Conv1D), naming the module and the sizes
that would work.

A saved plan's `ExpertsStyle` places stacked experts as for an unnamed module (by the mesh); its
`HeadsStyle` leaves the attention replicated here, for `unflatten_heads` to cut by whole heads.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from fxpar._torch.placements import StridedShard as _StridedShard
from fxpar.analysis.plan_io import ExpertsStyle, HeadsStyle
from fxpar.core.errors import PlanError, ShardingError
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.plan import TPStyle
from fxpar.core.spec import NodeInfo, divides, make_spec, set_info, size_hint
from fxpar.ops.moe import moe_experts
from fxpar.passes._embedding_sums import partner_tables
from fxpar.passes._graph import module_fqns, param_nodes
from fxpar.passes._megatron import (find_pairs, heads_of, is_projection, proj_bias, proj_in_features,
                                    proj_out_features, proj_weight, proj_weight_dims)
from fxpar.rules.conv import CONVS, conv_groups

aten = torch.ops.aten


def _use_placement(user: fx.Node, pos: int, style: TPStyle) -> Placement | None:
    """How `style` shards a tensor used as argument `pos` of `user` (None: unknown use)."""
    col = style.kind == "colwise"
    target = user.target
    if target in (aten.matmul.default, aten.einsum.default) and is_projection(user):  # x @ W on a raw Parameter
        out_dim, in_dim = proj_weight_dims(user)
        return Shard(out_dim) if col else Shard(in_dim)
    if target == aten.linear.default:
        return {1: Shard(0) if col else Shard(1), 2: Shard(0) if col else Replicate()}.get(pos)
    if target == aten.addmm.default:  # Conv1D: addmm(bias, x, weight[in, out])
        return {2: Shard(1) if col else Shard(0), 0: Shard(0) if col else Replicate()}.get(pos)
    if target in CONVS:
        return {1: Shard(0) if col else Shard(1), 2: Shard(0) if col else Replicate()}.get(pos)
    if target == aten.batch_norm.default and pos in (1, 2, 3, 4) and col:
        return Shard(0)  # per-channel parameters and running statistics, in a colwise region
    if target == aten.add.Tensor and user.meta["val"].ndim >= 1:
        # a raw bias added to a projection's output (x @ self.w + self.b): sharded with its features
        other = user.args[1 - pos] if pos in (0, 1) else None
        if isinstance(other, fx.Node) and is_projection(other) and user.args[pos].meta["val"].ndim == 1 \
                and user.args[pos].meta["val"].shape[0] == proj_out_features(other):
            return Shard(0) if col else Replicate()
    if target == aten.embedding.default and pos == 0:
        return Shard(1) if col else Shard(0)  # rowwise on an embedding is vocab parallel
    return None


def _placement_for(node: fx.Node, style: TPStyle, module: str, fused: int = 0, *, auto: bool = False
                   ) -> Placement:
    """The tp placement of parameter `node` under `style`; an automatic style leaves a parameter of
    unknown use replicated (always correct), a style the plan names raises PlanError instead."""
    if style.kind == "replicate" or not node.users or node.meta["val"].ndim == 0:
        return Replicate()  # (a 0-dim tensor: BatchNorm's num_batches_tracked)
    uses = {(user, i) for user in node.users for i, a in enumerate(user.args)
            if a is node or isinstance(a, (list, tuple)) and node in a}
    uses = sorted(uses, key=lambda u: (u[0].target == aten.embedding.default, u[0].name))
    places = [(_use_placement(u, i, style), u.target) for u, i in uses]
    if any(p is None for p, _ in places) and auto:
        return Replicate()
    if any(p is None for p, _ in places):
        name = str(node.target).rpartition(".")[2]
        unknown = sorted({str(t) for p, t in places if p is None})
        raise PlanError(
            f"style '{style}' on module '{module}': fxpar does not know how to shard its parameter '{name}' "
            f"(used by {unknown}); '{style}' applies to Linear, Conv1D, Conv1d/2d/3d and Embedding modules "
            f"(and BatchNorm as 'colwise'). Map '{module}' to 'replicate' or to a style for its kind"
        )
    # A tied weight (embedding + lm_head) takes the projection's placement; the embedding rule accepts both.
    p = places[0][0]
    if fused > 1 and p.is_shard():
        return _StridedShard(p.dim, split_factor=fused)
    return p


def _auto_styles(gm: fx.GraphModule, taken: set[str], tp: int
                 ) -> tuple[dict[str, TPStyle], dict[str, int], dict[str, str], dict[str, TPStyle]]:
    """Megatron pairs and the lm_head found in the graph, for modules the plan does not name.

    Returns (module -> style, module -> fused sections, module -> why it stays replicated,
    parameter -> style of the projection using it: a custom module holding raw Parameters may hold
    both halves of a pair).
    """
    styles: dict[str, TPStyle] = {}
    fused: dict[str, int] = {}
    notes: dict[str, str] = {}
    by_param: dict[str, TPStyle] = {}

    def own(proj: fx.Node, style: TPStyle) -> None:
        # its weight, its bias, and a raw bias added to its output (x @ self.w + self.b)
        added = [a for u in proj.users if u.target == aten.add.Tensor for a in u.args
                 if isinstance(a, fx.Node) and a.op == "get_attr" and a.meta["val"].ndim == 1]
        for p in (proj_weight(proj), proj_bias(proj), *added):
            if p is not None and p.op == "get_attr":
                by_param[str(p.target)] = style

    def module_of(proj: fx.Node) -> str | None:
        w = proj_weight(proj)
        return str(w.target).rpartition(".")[0] if w.op == "get_attr" else None

    for pair in find_pairs(gm):
        sink_mod = module_of(pair.sink)
        in_features = proj_in_features(pair.sink)
        if sink_mod is None or sink_mod in taken:
            continue
        if divides(in_features, tp) is not True:
            why = f"its {in_features} input features do not divide by tp={tp}"
            notes.update({m: why for m in [sink_mod, *map(module_of, pair.heads)] if m})
            continue
        heads = []
        for h in pair.heads:
            mod = module_of(h)
            k = pair.fused.get(h, 1)
            if mod is None or mod in taken:
                continue
            if mod == sink_mod and k > 1:
                notes[mod] = "a fused projection and its row-parallel partner in one module"
                continue
            bad_heads = [c for c in heads_of(h, pair.region) if divides(c, tp) is not True]
            if divides(proj_out_features(h), tp * k) is not True:
                notes[mod] = f"{proj_out_features(h)} output features do not divide by tp={tp}" + \
                    (f" x {k} sections" if k > 1 else "")
            elif bad_heads:
                notes[mod] = f"{bad_heads[0]} heads do not divide by tp={tp}"
            else:
                heads.append(((mod, k), h))
        if not heads:
            notes.setdefault(sink_mod, "its column-parallel partners could not be sharded")
            continue
        for (mod, k), h in heads:
            styles[mod] = TPStyle("colwise")
            own(h, styles[mod])
            if k > 1:
                fused[mod] = k
        styles[sink_mod] = TPStyle("rowwise")
        own(pair.sink, styles[sink_mod])
        for mod in _channel_norms(pair.region, tp):
            if mod not in taken:
                styles[mod] = TPStyle("colwise")
    # The token embedding, untied: vocab parallel (rows sharded, a masked lookup reduced right after it).
    emb = _token_embedding(gm)
    if emb is not None:
        weight = emb.args[0]
        mod = str(weight.target).rpartition(".")[0]
        rows = weight.meta["val"].shape[0]
        tied = any(u.target != aten.embedding.default for u in weight.users)
        if mod and mod not in taken and mod not in styles and not tied:
            if divides(rows, tp) is True:
                styles[mod] = TPStyle("rowwise")
            else:
                notes[mod] = f"its {rows} rows (vocabulary) do not divide by tp={tp}"
    # The lm_head: a projection feeding the graph output, column parallel (its logits are gathered).
    for node in gm.graph.nodes:
        if is_projection(node) and _feeds_output(node):
            mod = module_of(node)
            if mod and mod not in taken and mod not in styles and divides(proj_out_features(node), tp) is True:
                styles[mod] = TPStyle("colwise")
                own(node, styles[mod])
    if emb is not None:
        _shard_partner_tables(emb, styles, notes, taken, tp)
    return styles, fused, notes, by_param


def _shard_partner_tables(emb: fx.Node, styles: dict, notes: dict, taken: set[str], tp: int) -> None:
    """Position / type tables summed with a vocab-parallel token embedding: row parallel too.

    Their Partial lookups add to the token lookup's Partial, reduced once at the sum's root
    (`fxpar.passes._embedding_sums`), so sharding them costs no collective."""
    weight = emb.args[0]
    tok = styles.get(str(weight.target).rpartition(".")[0])
    if tok is None or tok.kind == "replicate":
        return
    shardable, kept = [], []
    for table in partner_tables(emb):
        mod = str(table.target).rpartition(".")[0]
        if not mod or mod in taken or mod in styles:
            kept.append(mod)
            continue
        if any(u.target != aten.embedding.default for u in table.users):
            notes[mod] = "it is also used by other ops than its lookup"
            kept.append(mod)
        elif divides(table.meta["val"].shape[0], tp) is not True:
            notes[mod] = f"its {table.meta['val'].shape[0]} rows do not divide by tp={tp}"
            kept.append(mod)
        else:
            shardable.append(mod)
    for mod in shardable:
        if kept:
            # A replicated table in the sum makes the Partial reduce before it is added, and a sharded
            # one after it would reduce a second time: all of the sum's tables or none.
            notes[mod] = f"{', '.join(m or '<root>' for m in kept)} in the same sum stays replicated (one all-reduce, not two)"
        else:
            styles[mod] = TPStyle("rowwise")


def _channel_norms(region: set[fx.Node], tp: int) -> list[str]:
    """Modules of the batch norms and grouped convs (groups dividing by tp: a depthwise conv) inside a
    pair's region: they act per channel or per group of channels, so they shard with it."""
    mods = []
    for node in region:
        if node.target in CONVS and conv_groups(node) > 1 and conv_groups(node) % tp == 0 \
                and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
            mods.append(str(node.args[1].target).rpartition(".")[0])
        if node.target == aten.batch_norm.default:
            params = [a for a in node.args[1:5] if isinstance(a, fx.Node)]
            if params and all(a.op == "get_attr" for a in params):
                mods.append(str(params[0].target).rpartition(".")[0])
    return sorted(set(mods))


_LOSSES = (aten.cross_entropy_loss.default, aten.nll_loss_forward.default, aten.nll_loss_nd.default)


def _token_embedding(gm: fx.GraphModule) -> fx.Node | None:
    """The lookup of the model's tokens: the largest embedding indexed (through views) by a graph input."""
    found = []
    for node in gm.graph.nodes:
        if node.target != aten.embedding.default or node.args[0].op != "get_attr":
            continue
        ids = node.args[1]
        while ids.op == "call_function" and ids.target in (aten.view.default, aten.reshape.default):
            ids = ids.args[0]
        if ids.op == "placeholder":
            found.append(node)
    return max(found, key=lambda n: size_hint(n.args[0].meta["val"].shape[0]), default=None)


def _feeds_output(node: fx.Node) -> bool:
    """Whether `node` (through views) is a graph output or the input of a captured loss (also through a
    log_softmax: a hand-written cross-entropy, which `decompose_loss` runs on vocab shards)."""
    cur, log_probs = node, False
    while True:
        # a hand-written loss: nll_loss(log_softmax(logits)), or log_softmax(logits).gather(-1, target)
        if any(u.op == "output" or (u.target in _LOSSES and u.args[0] is cur)
               or (log_probs and u.target == aten.gather.default and u.args[0] is cur) for u in cur.users):
            return True
        if len(cur.users) != 1:
            return False
        (cur,) = cur.users
        log_probs |= cur.target in (aten.log_softmax.int, aten._log_softmax.default)
        if cur.target not in (aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.log_softmax.int,
                              aten._log_softmax.default):
            return False


def _expert_placements(node: fx.Node, mesh) -> tuple[list[Placement], str] | None:
    """Stacked expert weights (a `moe_experts` argument): by index on 'ep', by feature on 'tp'.

    On tp each expert is column parallel (gate / up: dim 1, a fused [gate; up] section by section)
    and row parallel (down: dim 2); the feature split keeps every rank's compute balanced whatever
    the routing, and costs the one all-reduce a dense MLP costs. Dims that do not divide stay
    Replicate (exact, noted in explain)."""
    uses = [(u, u.args.index(node)) for u in node.users if u.target is moe_experts and node in u.args]
    if not uses:
        return None
    user, pos = uses[0]
    fused = user.args[4] is None
    shape = node.meta["val"].shape
    placements: list[Placement] = [Replicate() for _ in mesh.names]
    parts = []
    if mesh.has("ep") and mesh.size("ep") > 1:
        if divides(shape[0], mesh.size("ep")) is True:
            placements[mesh.index("ep")] = Shard(0)
            parts.append(f"experts by index over ep ({shape[0]} / {mesh.size('ep')})")
        else:
            parts.append(f"experts replicated on ep: {shape[0]} experts do not divide by ep={mesh.size('ep')}")
    if mesh.has("tp") and mesh.size("tp") > 1:
        dim = 2 if pos == 5 else 1
        k = 2 if fused and pos == 3 else 1
        if divides(shape[dim], mesh.size("tp") * k) is True:
            placements[mesh.index("tp")] = _StridedShard(1, split_factor=2) if k == 2 else Shard(dim)
            parts.append("each expert colwise (gate, up" + (" fused x2" if fused else "") + ") and rowwise (down)")
        else:
            parts.append(f"replicate on tp (not sharded: {shape[dim]} features do not divide by tp)")
    return placements, "experts: " + ", ".join(parts) if parts else "experts: replicated"


def _divisors(size: int, limit: int = 64) -> list[int]:
    return [d for d in range(2, limit + 1) if size % d == 0]


@fx_pass(requires=("captured",), provides=("param_placements",))
def annotate_parameters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    styles = ctx.plan.resolve_tp(module_fqns(gm)) if ctx.plan.tp else {}
    if any(not isinstance(s, ExpertsStyle) for s in styles.values()) and not mesh.has("tp"):
        raise PlanError(f"the plan has tensor-parallel styles but the mesh {mesh.names} has no 'tp' dim; "
                        "name a mesh dim 'tp' or drop the tp part of the plan")
    tp_dim = mesh.names.index("tp") if mesh.has("tp") else None
    fused: dict[str, int] = {}
    notes: dict[str, str] = {}
    by_param: dict[str, TPStyle] = {}
    explicit = set(styles)
    if ctx.plan.auto_tp and tp_dim is not None:
        auto, fused, notes, by_param = _auto_styles(gm, explicit, mesh.sizes[tp_dim])
        styles = {**auto, **styles}
    for node in param_nodes(gm):
        fqn = str(node.target)
        module = fqn.rpartition(".")[0]
        style = styles.get(module) if module in explicit else by_param.get(fqn, styles.get(module))
        heads = style if isinstance(style, HeadsStyle) else None
        if isinstance(style, (ExpertsStyle, HeadsStyle)):  # placed by the mesh / cut by unflatten_heads
            style = None
        placements = [Replicate() for _ in mesh.names]
        if style is not None and tp_dim is not None:
            p = _placement_for(node, style, module, fused.get(module, getattr(style, "sections", 0)),
                               auto=module not in explicit)
            if isinstance(p, (Shard, _StridedShard)):
                size = node.meta["val"].shape[p.dim]
                n = mesh.sizes[tp_dim]
                # a Linear's plain Shard of a static size that does not divide is cut unevenly (torch.chunk's
                # rows): exact through linear / pointwise ops, gathered (padded) before any other
                uneven = type(p) is Shard and isinstance(size, int) and size % n != 0 and \
                    all(u.target is aten.linear.default for u in node.users)
                if uneven:
                    style = f"{style} (uneven: {size} in chunks of {-(-size // n)} over tp={n})" \
                        if " (uneven" not in str(style) else style
                elif divides(size, n * getattr(p, "split_factor", 1)) is not True:
                    raise ShardingError(
                        f"'{style}' on module '{module}': dim {p.dim} of parameter '{fqn}' has size {size}, "
                        f"which does not divide by tp={n} (only an nn.Linear's plain shard may be uneven); use tp in "
                        f"{_divisors(int(size))} or map '{module}' to 'replicate' in the plan"
                    )
            placements[tp_dim] = p
        experts = _expert_placements(node, mesh) if style is None else None
        if experts is not None:
            placements, text = experts
        else:
            text = str(style) if style is not None else None
        spec = make_spec(node.meta["val"], tuple(placements), mesh.sizes)
        if text is not None and fused.get(module, 0) > 1:
            text += f" (fused x{fused[module]})"
        if style is None and module in notes:
            text = f"replicate (not sharded: {notes[module]})"
        if heads is not None:  # unflatten_heads records the cut where it applies
            text = f"replicate (not sharded: saved as {heads.kind} by uneven heads, not cut by unflatten_heads here)" \
                if not heads.kv_replicated else "replicate (not sharded: saved as colwise by kv heads replicated, " \
                "not applied by replicate_kv_heads here)"
        set_info(node, NodeInfo(spec=spec, module_fqn=module, role="param", param_fqn=fqn,
                                origin="annotate_parameters", style=text))
    return PassResult(gm, True)
