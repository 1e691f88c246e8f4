"""insert_collectives: make every edge's placements match what its consumer needs.

Requires: specs. Provides: collectives.

For each consumer and each tensor input whose placements differ from the ones
the consumer's strategy needs, inserts the transitions of
`fxpar.ops.collectives` mesh dim by mesh dim (all_reduce, all_gather, shard,
reduce_scatter, all_to_all). Then, for every Replicate input of an op whose
output is not Replicate on that mesh dim, inserts `grad_all_reduce`
(identity forward, all-reduce backward): that input's gradient is partial on
each rank. A redistributed value is shared by all consumers needing the same
placements, so e.g. q, k and v projections share one grad_all_reduce.

An FSDP parameter read by an op replicated on fsdp normally gets a plain
all_gather (its gradient there is full, not partial). Where that op's value is
computed from gathers of FSDP units only and read only by batch-sharded work,
the whole cone takes partial gradients instead, where that moves no more
bytes: the fsdp grad_all_reduce at its readers is left out and the unit's
reduce-scatter sums (`_partial_gradient_cones`; `fxpar.check`'s dual
invariant follows the same rule).

Before:  %linear_1 = aten.linear(%gelu, %down_weight)              # P
         %add = aten.add.Tensor(%linear_1, %down_bias)             # needs R
After:   %allreduce_linear_1 = fxpar.all_reduce(%linear_1, '1', 'tp')
         %add = aten.add.Tensor(%allreduce_linear_1, %down_bias)
and      %linear = aten.linear(%x, %up_weight, %up_bias)          # x R, output S(1)
becomes  %gradallreduce_x = fxpar.grad_all_reduce(%x, '1', 'tp')
         %linear = aten.linear(%gradallreduce_x, %up_weight, %up_bias)
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.distributed.tensor.placement_types import Placement, Replicate, Shard

from fxpar.analysis.cost import evaluate, example_sizes, value_bytes
from fxpar.core.dataflow import computes_no_value
from fxpar.core.errors import ShardingError, module_fqn_of, node_context
from fxpar.core.mesh import MeshInfo
from fxpar.core.pass_api import PassContext, PassResult, fx_pass
from fxpar.core.spec import NodeInfo, get_info, make_spec, set_info, shard_order
from fxpar.ops.collectives import COLLECTIVE_OPS
from fxpar.ops.transitions import collective_args, insert_grad_all_reduce, insert_sp_all_gather, insert_transition, transition_op
from fxpar.passes._graph import differentiable
from fxpar.rules import replace_tensor_args, tensor_args

_FSDP_GATHER = torch.ops.fxpar.fsdp_all_gather.default
_VIEWS = (torch.ops.aten.view.default, torch.ops.aten.reshape.default)


def _group(mesh: MeshInfo, m: int) -> str:
    # Dry runs have no process groups; their graphs are for reading, not running.
    return mesh.group_names[m] if mesh.group_names else f"dryrun:{mesh.names[m]}"


def _out_placements(info: NodeInfo, m: int) -> list[Placement]:
    spec = info.spec
    specs = spec if isinstance(spec, tuple) else (spec,)
    return [s.placements[m] for s in specs if s is not None]


class _Inserter:
    def __init__(self, graph: fx.Graph, mesh: MeshInfo) -> None:
        self.graph = graph
        self.mesh = mesh
        self.cache: dict[tuple, fx.Node] = {}

    def _new(self, node: fx.Node, src: fx.Node, placements: tuple, owner: fx.Node, role: str) -> fx.Node:
        node.meta["val"] = src.meta["val"]
        for key in ("nn_module_stack", "stack_trace"):
            if key in owner.meta:
                node.meta[key] = owner.meta[key]
        set_info(node, NodeInfo(spec=make_spec(src.meta["val"], placements, self.mesh.sizes),
                                module_fqn=module_fqn_of(owner), role=role, origin="insert_collectives"))
        return node

    def redistribute(self, x: fx.Node, need: tuple, consumer: fx.Node) -> fx.Node:
        have = tuple(get_info(x).spec.placements)
        key = (x, need)
        if have == need:
            return x
        if key in self.cache:
            return self.cache[key]
        cur, placements = x, list(have)
        # Leaving shards (gathers) undoes the cuts last-cut first: activations were cut in mesh order
        # (a batch over dp, then ep: put back over ep, then dp), parameters fsdp last (`shard_order`).
        # Every other transition goes in mesh order.
        info = get_info(x)
        cuts = shard_order(self.mesh.names) if info is not None and info.role == "param" else range(len(have))
        leaving = [m for m in cuts if have[m] != need[m] and have[m] is not None and have[m].is_shard()]
        order = [*reversed(leaving), *(m for m in range(len(have)) if m not in leaving)]
        for m in order:
            src, dst = have[m], need[m]
            try:
                op = transition_op(src, dst)
            except ShardingError as e:
                raise ShardingError(f"{node_context(consumer)}: input %{x.name} is {src} on mesh dim "
                                    f"'{self.mesh.names[m]}' but the op needs {dst}: {e}") from e
            if op is None:
                continue
            steps = [(src, dst)]
            if op == "all_to_all" and self._uneven_dims(x, src, dst, m):
                # No padded all_to_all: an uneven shard moves dims as a gather, then a local cut (exact).
                steps = [(src, Replicate()), (Replicate(), dst)]
            for s, d in steps:
                step_op = transition_op(s, d)
                full_size = self._uneven(x, step_op, s, d, m, consumer)
                with self.graph.inserting_before(consumer):
                    new = insert_transition(
                        self.graph, cur, s, d, mesh_dim=m, mesh_dim_name=self.mesh.names[m],
                        group_size=self.mesh.sizes[m], group_name=_group(self.mesh, m), label=x.name,
                        full_size=full_size)
                placements[m] = d
                owner = consumer if step_op == "shard" else x
                cur = self._new(new, x, tuple(placements), owner, "collective")
        self.cache[key] = cur
        return cur

    def _uneven_dims(self, x: fx.Node, src: Placement, dst: Placement, m: int) -> list[int]:
        """The dims of a src -> dst transition on mesh dim m that do not divide by its size."""
        spec, n = get_info(x).spec, self.mesh.sizes[m]
        dims = {p.dim for p in (src, dst) if isinstance(p, Shard)}
        return [d for d in dims if isinstance(spec.shape[d], int) and spec.shape[d] % n]

    def _uneven(self, x: fx.Node, op: str, src: Placement, dst: Placement, m: int, consumer: fx.Node) -> int | None:
        """The dim size an all_gather / shard of an uneven shard (torch.chunk's rows) rebuilds or cuts, else None.

        Raises:
            ShardingError: any other transition of an uneven shard (no padded reduce_scatter / all_to_all).
        """
        spec, n = get_info(x).spec, self.mesh.sizes[m]
        dims = {p.dim for p in (src, dst) if isinstance(p, Shard)}
        uneven = [d for d in dims if isinstance(spec.shape[d], int) and spec.shape[d] % n]
        if not uneven:
            return None
        d = uneven[0]
        nested = any(isinstance(p, Shard) and p.dim == d for k, p in enumerate(spec.placements) if k != m)
        if op not in ("all_gather", "shard") or nested:
            raise ShardingError(
                f"{node_context(consumer)}: input %{x.name} would need a {op} of dim {d} (size {spec.shape[d]}), "
                f"which does not divide by {self.mesh.names[m]}={n}, in module '{module_fqn_of(consumer)}': only "
                "all_gather and a local cut take uneven shards; use a mesh dim size that divides it or map the "
                "module to 'replicate' in the plan")
        return int(spec.shape[d])

    def full_gradient_gather(self, a: fx.Node, consumer: fx.Node, info: NodeInfo) -> fx.Node:
        """An FSDP-gathered parameter used by an op that runs replicated on fsdp gets a plain all_gather.

        fsdp_all_gather's backward reduce-scatters (sums) the gradient, right for uses on
        batch-sharded data (partial gradients); a replicated use already yields the full gradient
        on every rank, which summing would multiply by the fsdp size.
        """
        if a.target is not _FSDP_GATHER or consumer.op == "output":
            return a
        f = self.mesh.names.index("fsdp")
        if any(not p.is_replicate() for p in _out_placements(info, f)):
            return a
        key = (a, "plain")
        if key not in self.cache:
            shard = a.args[0]
            with self.graph.inserting_before(consumer):
                full_size = collective_args(a).get("full_size", -1)  # an uneven shard: padded like its gather
                new = insert_transition(
                    self.graph, shard, get_info(shard).spec.placements[f], get_info(a).spec.placements[f],
                    mesh_dim=f, mesh_dim_name="fsdp", group_size=self.mesh.sizes[f],
                    group_name=_group(self.mesh, f), label=shard.name, full_size=full_size if full_size >= 0 else None)
            self.cache[key] = self._new(new, shard, tuple(get_info(a).spec.placements), consumer, "param")
        return self.cache[key]

    def grad_all_reduce(self, x: fx.Node, m: int, consumer: fx.Node) -> fx.Node:
        fused = self._sp_gather(x, m, consumer)
        if fused is not None:
            return fused
        key = (x, "f", m)
        if key not in self.cache:
            with self.graph.inserting_before(consumer):
                new = insert_grad_all_reduce(self.graph, x, mesh_dim_name=self.mesh.names[m],
                                             group_name=_group(self.mesh, m), label=x.name)
            self.cache[key] = self._new(new, x, tuple(get_info(x).spec.placements), consumer, "marker")
        return self.cache[key]


    def _sp_gather(self, x: fx.Node, m: int, consumer: fx.Node) -> fx.Node | None:
        """An all_gather on m whose result needs Megatron's f on m: one sp_all_gather instead.

        all_gather's backward slices and f's all-reduces, which is a reduce-scatter done at twice
        its bytes; sp_all_gather gathers forward and reduce-scatters backward (Megatron-SP's g).
        """
        if x.target in _VIEWS and isinstance(x.args[0], fx.Node):
            # a view of the gathered value (Conv1D's (B*T, C)): the view of the fused gather
            inner = self._sp_gather(x.args[0], m, x)
            if inner is None:
                return None
            key = (x, "sp-view", m)
            if key not in self.cache:
                with self.graph.inserting_before(consumer):
                    view = self.graph.create_node("call_function", x.target, (inner, *x.args[1:]), dict(x.kwargs),
                                                  name=f"{x.name}_sp")
                view.meta.update(x.meta)
                self.cache[key] = view
            return self.cache[key]
        if x.target is not torch.ops.fxpar.all_gather.default or x.args[4] != self.mesh.names[m] \
                or (len(x.args) > 5 and x.args[5] != 1) or (len(x.args) > 6 and x.args[6] >= 0):
            return None  # an uneven gather (full_size >= 0) keeps all_gather + f: no padded reduce-scatter
        key = (x, "sp", m)
        if key not in self.cache:
            src = x.args[0]
            with self.graph.inserting_before(consumer):
                new = insert_sp_all_gather(self.graph, src, dim=x.args[1], mesh_dim_name=self.mesh.names[m],
                                           group_size=x.args[2], group_name=x.args[3], label=src.name)
            self.cache[key] = self._new(new, src, tuple(get_info(x).spec.placements), x, "collective")
        return self.cache[key]


def _feeds_batch_sharded(user: fx.Node, x: fx.Node, fsdp: int) -> bool:
    """Whether `user` takes `x` Replicate on fsdp and makes an output sharded on fsdp (batch-sharded work):
    the gradient it hands back to `x` is then partial on fsdp (this rank's batch's share)."""
    info = get_info(user)
    if user.op != "call_function" or info is None or info.input_placements is None:
        return False
    if all(p.is_replicate() for p in _out_placements(info, fsdp)):
        return False
    return all(need[fsdp].is_replicate() for a, need in zip(tensor_args(user), info.input_placements) if a is x)


def _partial_gradient_cones(gm: fx.GraphModule, fsdp: int, needs_grad: set[fx.Node]) -> set[fx.Node]:
    """Values replicated on fsdp that may take a partial gradient: computed from the gathers of FSDP units
    (and from values needing no gradient), and read only by each other and by batch-sharded work.

    GPT-2's position lookup `wpe(arange(T))` runs replicated on fsdp, so its table would take a plain
    all_gather (`full_gradient_gather`) and the lookup's output a grad_all_reduce where the token embedding
    (batch-sharded) adds it: two collectives beside the root unit's. Every gradient into such a cone is the
    sum over ranks of what reaches it (each rank's batch share), and backward ops are linear in their
    gradient, so the sum may be taken at the cone's leaves instead: the unit's reduce-scatter, which sums
    already. The table then stays in its unit (gathered and reduce-scattered with it) and neither collective
    is inserted. A leaf must be the gather of an FSDP unit (`fsdp_bucket`: the root, a block, a module),
    which reduce-scatters anyway; fsdp_unit='param' keeps the plain gather and the all-reduce of the used rows.
    """
    def from_cone(node: fx.Node) -> bool:  # replicated on fsdp, from unit gathers and cone values only
        info = get_info(node)
        if node.op != "call_function" or node not in needs_grad or node.target in COLLECTIVE_OPS \
                or info is None or info.input_placements is None \
                or any(not p.is_replicate() for p in _out_placements(info, fsdp)):
            return False
        for a, need in zip(tensor_args(node), info.input_placements):
            if a not in needs_grad:
                continue
            leaf = a.target is _FSDP_GATHER and get_info(a) is not None and get_info(a).fsdp_bucket is not None
            if not need[fsdp].is_replicate() or not (leaf or a in cone):
                return False
        return True

    def read_partially(node: fx.Node) -> bool:  # every reader hands back a partial gradient
        return all(u in cone or _feeds_batch_sharded(u, node, fsdp) or computes_no_value(u) for u in node.users)

    cone: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if from_cone(node):
            cone.add(node)
    changed = True
    while changed:  # a replicated reader would mix a full gradient in; then its inputs are out as well
        changed = False
        for node in gm.graph.nodes:
            if node in cone and not (read_partially(node) and from_cone(node)):
                cone.discard(node)
                changed = True
    return _where_it_moves_fewer_bytes(gm, cone)


def _where_it_moves_fewer_bytes(gm: fx.GraphModule, cone: set[fx.Node]) -> set[fx.Node]:
    """The connected parts of `cone` whose parameters' reduce-scatter moves no more bytes than the all-reduces
    it saves (at the example sizes): per rank, a reduce-scatter sends (n-1)/n of its buffer, an all-reduce
    twice that. GPT-2 at full context (T = its position rows) saves two collectives and half the bytes; a
    short sequence on a long table (T = 128 of 1024 rows) keeps the all-reduce of the rows it uses."""
    parts: dict[fx.Node, set[fx.Node]] = {}  # union of cone nodes joined by an edge, by representative
    rep: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node not in cone:
            continue
        joined = {node} | {x for a in tensor_args(node) if a in rep for x in parts.pop(rep[a], set())}
        for x in joined:
            rep[x] = node
        parts[node] = joined
    hints = example_sizes(gm)
    keep: set[fx.Node] = set()
    for part in parts.values():
        leaves = {a for node in part for a in tensor_args(node) if a.target is _FSDP_GATHER}
        read = [node for node in part if any(u not in part for u in node.users if not computes_no_value(u))]
        try:
            reduced = evaluate(sum(value_bytes(a) for a in leaves), hints)
            saved = 2 * evaluate(sum(value_bytes(node) for node in read), hints)
        except (TypeError, ValueError):  # a size with no example value (data-dependent): keep the all-reduce
            continue
        if reduced <= saved:
            keep |= part
    return keep


@fx_pass(requires=("specs",), provides=("collectives",))
def insert_collectives(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    mesh = ctx.mesh
    ins = _Inserter(gm.graph, mesh)
    needs_grad = differentiable(gm)
    fsdp = mesh.names.index("fsdp") if "fsdp" in mesh.names else None
    partial = _partial_gradient_cones(gm, fsdp, needs_grad) if fsdp is not None else set()
    modified = False
    for node in list(gm.graph.nodes):
        info = get_info(node)
        if info is None or info.input_placements is None or info.origin == "insert_collectives":
            continue
        # mesh dims on which some output is not Replicate: Replicate inputs there need Megatron's f
        sharded_out = [] if node.op == "output" else \
            [m for m in range(mesh.ndim) if any(not p.is_replicate() for p in _out_placements(info, m))]
        args = tensor_args(node)
        new_args = []
        changed = False
        for a, need in zip(args, info.input_placements):
            if a.target is _FSDP_GATHER and node not in partial:
                a = ins.full_gradient_gather(a, node, info)
            b = ins.redistribute(a, tuple(need), node)
            if sharded_out and a in needs_grad:
                for m in sharded_out:
                    if m == fsdp and (a.target is _FSDP_GATHER or a in partial):
                        continue  # its backward (or its cone's gathers') reduce-scatters the partial gradient
                    if need[m].is_replicate():
                        b = ins.grad_all_reduce(b, m, node)
            new_args.append(b)
            changed = changed or b is not args[len(new_args) - 1]
        if changed:
            replace_tensor_args(node, new_args)
            modified = True
    # An FSDP gather all of whose uses took the plain all_gather instead, or an all_gather all of whose
    # uses took sp_all_gather, is dead communication
    # (collectives are side-effectful, so dead code elimination keeps them).
    for node in reversed(list(gm.graph.nodes)):
        if node.target in _VIEWS and not node.users and node.args[0].target is torch.ops.fxpar.all_gather.default:
            gm.graph.erase_node(node)  # a view of a gather that sp_all_gather replaced
    for node in list(gm.graph.nodes):
        if node.target in (_FSDP_GATHER, torch.ops.fxpar.all_gather.default) and not node.users:
            gm.graph.erase_node(node)
            modified = True
    return PassResult(gm, modified)
