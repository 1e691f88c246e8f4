"""Collective-order fingerprints: ranks that would diverge fail at once, naming the collective.

Two ranks of a group that issue different collectives hang (different ops or
shapes) or, worse, silently combine unrelated tensors (the same op and shape
in a different order). Every rank's graph fixes its collectives' order, so
the order can be compared before anything runs:

    schedule(rank, group) = [CollectiveSig(direction, op, mesh dim, local shape, dtype, node), ...]
                            for the collectives on that group's mesh dim, forward in graph
                            order (an issued FSDP gather at its issue node, fxpar.analysis.overlap;
                            with issue nodes in the graph, the other FSDP gathers where they stand),
                            then the communicating backward duals in reverse order
    fingerprint           = (len(schedule), blake2b(schedule))

A `moe_experts` node with experts split over ep (`fxpar.ops.moe`) exchanges its
tokens inside itself; its all-to-alls are in the schedule all the same, from its
arguments (`fxpar.ops.moe.ep_exchanges`): counts, dispatch and combine on the ep
dim where the node stands, their duals in the backward, each with its split-size
structure (so two ranks that disagree on the experts per rank or the routed rows
differ). A node whose ep group or size is not the mesh's for that dim is an error
at once: its members would never meet.

`exchange` runs on a ParallelModule's first forward: one all_gather of the
16-byte fingerprint per mesh dim. Only when fingerprints differ do two more
all_gathers follow (every entry's hash, then the text of the first differing
entry on each rank), and every rank raises the same GraphInvariantError
naming the first differing collective as each rank has it. All ranks of a
group take the same branches, so the exchange itself cannot hang.

`collective_schedule` and `first_difference` also serve the static
cross-rank check (`fxpar.analysis.invariants.check_ranks`).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxpar._torch.c10d import functional, resolve_process_group
from fxpar.core.errors import GraphInvariantError, node_context
from fxpar.core.mesh import MeshInfo
from fxpar.core.spec import TensorSpec, get_info, size_hint
from fxpar.ops.collectives import BACKWARD_OF, COLLECTIVE_OPS
from fxpar.ops.moe import ep_exchanges, moe_experts
from fxpar.ops.overlap import ISSUE_OPS
from fxpar.ops.transitions import collective_args, dual_copies

__all__ = ["CollectiveSig", "collective_schedule", "schedule_fingerprint", "first_difference", "exchange",
           "moe_ep_exchanges"]

log = logging.getLogger(__name__)

_c10d = functional
_TEXT_BYTES = 512  # bytes of the description each rank sends when schedules differ

# Ops that communicate in the forward (shard slices locally, grad_all_reduce is the identity).
_FORWARD_COMMUNICATES = {"all_reduce", "all_reduce_max", "all_gather", "sp_all_gather", "reduce_scatter", "all_to_all"}


@dataclass(frozen=True)
class CollectiveSig:
    """One communication a rank will issue, as the fingerprint sees it.

    Attributes:
        direction: 'forward', or 'backward' for a collective's dual.
        op: the communication that runs (all_reduce, all_gather, reduce_scatter, all_to_all).
        mesh_dim: the mesh dim (its group).
        group: this rank's group name for that dim.
        shape: the local shape of the tensor going in (symbolic sizes as their expressions).
        dtype: its dtype.
        node: the graph node that issues it (or whose backward does).
        module: the user module that node belongs to.
        splits: how its split sizes are made, for all-to-alls with uneven splits (the MoE token
            exchange); '' for the others.
    """

    direction: str
    op: str
    mesh_dim: str
    group: str
    shape: tuple[str, ...]
    dtype: str
    node: str
    module: str
    splits: str = ""

    def key(self) -> tuple:
        """What must agree across the ranks of a group (the group name is per rank, so left out)."""
        key = (self.direction, self.op, self.mesh_dim, self.shape, self.dtype, self.node)
        return key + (self.splits,) if self.splits else key

    def __str__(self) -> str:
        where = f" in '{self.module}'" if self.module else ""
        splits = f" splits {self.splits}" if self.splits else ""
        return (f"{self.direction} {self.op}({self.mesh_dim}) [{', '.join(self.shape)}] {self.dtype}{splits} "
                f"at %{self.node}{where}")


def _shape(shape) -> tuple[str, ...]:
    return tuple(str(s) for s in shape)


def collective_schedule(gm: fx.GraphModule, mesh: MeshInfo) -> list[CollectiveSig]:
    """The communications `gm` issues on every mesh dim, forward then backward duals.

    Args:
        gm: a rewritten graph module.
        mesh: the mesh it was compiled for (group names are read from the nodes).

    Returns:
        Forward collectives in graph order, then the duals that communicate in
        reverse graph order.
    """
    forward, backward = [], []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is moe_experts and node.kwargs.get("ep_size", 1) > 1:
            _check_ep_group(node, mesh)
    issued = {s for n in gm.graph.nodes if n.op == "call_function" and n.target in ISSUE_OPS for s in n.args[0]}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in ISSUE_OPS:
            a = dict(zip(("dim", "group_size", "group_name", "mesh_dim"), node.args[1:5]))
            shapes = [get_info(s).spec.local_shape if get_info(s) is not None else () for s in node.args[0]]
            dtype = str(node.args[5] or node.args[0][0].meta["val"].dtype).replace("torch.", "")
            forward.append(CollectiveSig("forward", "all_gather", mesh_dim=a["mesh_dim"], group=a["group_name"],
                                         shape=tuple(str(tuple(str(d) for d in sh)) for sh in shapes), dtype=dtype,
                                         node=node.name, module=getattr(get_info(node), "module_fqn", "")))
            continue
        if node.op == "call_function" and node.target is moe_experts and node.kwargs.get("ep_size", 1) > 1:
            sigs = _moe_sigs(node)
            forward.extend(s for s in sigs if s.direction == "forward")
            backward.extend(s for s in reversed(sigs) if s.direction == "backward")  # reversed once more below
            continue
        if node.op != "call_function" or node.target not in COLLECTIVE_OPS:
            continue
        op = COLLECTIVE_OPS[node.target]
        args = collective_args(node)
        info = get_info(node)
        out_spec = info.spec if info is not None and isinstance(info.spec, TensorSpec) else None
        src = get_info(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        in_spec = src.spec if src is not None and isinstance(src.spec, TensorSpec) else None
        module = info.module_fqn if info is not None else ""
        dtype = str((out_spec or in_spec).dtype).replace("torch.", "") if (out_spec or in_spec) else "?"
        common = dict(mesh_dim=args["mesh_dim"], group=args["group_name"], dtype=dtype, node=node.name,
                      module=module)
        # An FSDP gather communicates where it stands unless an issue node started it earlier; with issue
        # nodes in the graph its order against them matters (two blocks' gathers have the same shapes).
        if op in _FORWARD_COMMUNICATES or op == "fsdp_all_gather" and issued and node.args[0] not in issued:
            forward.append(CollectiveSig("forward", op, shape=_shape(in_spec.local_shape if in_spec else ()),
                                         **common))
        dual = BACKWARD_OF.get(op)
        if dual is not None:
            # The dual's input is the gradient of this node's output (replica_grad_sum: a buffer of
            # `dual_copies` of them).
            copies = dual_copies(node)
            shape = _shape(out_spec.local_shape if out_spec else ())
            backward.append(CollectiveSig("backward", dual, shape=(str(copies), *shape) if copies != 1 else shape,
                                          **common))
    return forward + backward[::-1]


def _local_shape(node: fx.Node) -> tuple:
    info = get_info(node)
    if info is not None and isinstance(info.spec, TensorSpec):
        return tuple(info.spec.local_shape)
    val = node.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else ()


def moe_ep_exchanges(node: fx.Node) -> list:
    """The all-to-alls of a `moe_experts` node on ep (`fxpar.ops.moe.ep_exchanges`), from its arguments; [] off ep."""
    kw = node.kwargs
    if node.target is not moe_experts or kw.get("ep_size", 1) <= 1:
        return []
    x, idx = node.args[0], node.args[1]
    tokens, hidden = _local_shape(x)[:2]
    k = _local_shape(idx)[1]
    num_experts = kw.get("num_experts", node.args[6] if len(node.args) > 6 else None)
    return ep_exchanges(int(num_experts), int(kw["ep_size"]), tokens * k, hidden, x.meta["val"].dtype,
                        rows_hint=int(size_hint(tokens)) * int(size_hint(k)), hidden_hint=int(size_hint(hidden)))


def _moe_sigs(node: fx.Node) -> list[CollectiveSig]:
    kw = node.kwargs
    info = get_info(node)
    common = dict(op="all_to_all", mesh_dim=kw.get("ep_mesh_dim", "ep"), group=kw.get("ep_group", ""),
                  node=node.name, module=info.module_fqn if info is not None else "")
    return [CollectiveSig(e.direction, shape=_shape(e.shape), dtype=str(e.dtype).replace("torch.", ""),
                          splits=f"{e.name}: {e.splits} (n={kw['ep_size']})", **common)
            for e in moe_ep_exchanges(node)]


def _check_ep_group(node: fx.Node, mesh: MeshInfo) -> None:
    """The node's ep group and size are the mesh's for its ep dim, and its experts split evenly over it."""
    kw = node.kwargs
    dim, size, group = kw.get("ep_mesh_dim", "ep"), kw["ep_size"], kw.get("ep_group", "")
    fix = ("; the ep exchange runs inside the node on the group in its arguments: recompile the module "
           "(fxpar.rules.moe sets them from the mesh), and never edit one rank's graph")
    if dim not in mesh.names:
        raise GraphInvariantError(f"{node_context(node)}: exchanges tokens on mesh dim {dim!r}, which the mesh "
                                  f"{mesh.names} does not have{fix}")
    m = mesh.names.index(dim)
    if size != mesh.sizes[m]:
        raise GraphInvariantError(f"{node_context(node)}: ep_size={size} but mesh dim {dim!r} has {mesh.sizes[m]} "
                                  f"ranks{fix}")
    if mesh.group_names is not None and group != mesh.group_names[m]:
        raise GraphInvariantError(f"{node_context(node)}: exchanges tokens on group {group!r}, but this rank's "
                                  f"{dim!r} group is {mesh.group_names[m]!r}{fix}")
    num_experts = kw.get("num_experts", node.args[6] if len(node.args) > 6 else None)
    local = _local_shape(node.args[5])[:1]
    if num_experts is not None and local and int(size_hint(local[0])) * size != int(num_experts):
        raise GraphInvariantError(f"{node_context(node)}: holds {local[0]} experts on each of {size} ep ranks but "
                                  f"routes over num_experts={num_experts}{fix}")


def _entry_hash(sig: CollectiveSig) -> int:
    digest = hashlib.blake2b(repr(sig.key()).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def schedule_fingerprint(sigs: list[CollectiveSig]) -> tuple[int, int]:
    """(number of collectives, 64-bit hash of their keys in order)."""
    h = hashlib.blake2b(digest_size=8)
    for s in sigs:
        h.update(repr(s.key()).encode())
        h.update(b"\0")
    return len(sigs), int.from_bytes(h.digest(), "little", signed=True)


def first_difference(a: list[CollectiveSig], b: list[CollectiveSig]):
    """(index, a's entry, b's entry) of the first position where two schedules differ, or None."""
    for i in range(max(len(a), len(b))):
        x = a[i] if i < len(a) else None
        y = b[i] if i < len(b) else None
        if x is None or y is None or x.key() != y.key():
            return i, x, y
    return None


def _device(gm: fx.GraphModule) -> torch.device:
    for t in gm.parameters():
        return t.device
    for t in gm.buffers():
        return t.device
    return torch.device("cpu")


def _gather(t: torch.Tensor, n: int, group: str) -> torch.Tensor:
    out = _c10d.wait_tensor(_c10d.all_gather_into_tensor(t.contiguous(), n, group))
    return out.view(n, *t.shape)


def _exchangeable(group: str) -> bool:
    """False for groups whose collectives carry no data (torch's fake backend) or that do not exist."""
    try:
        pg = resolve_process_group(group)
    except Exception:  # noqa: BLE001 - no such group: a dry run
        return False
    try:
        backend = pg.name()
    except Exception:  # noqa: BLE001 - Python process groups may not implement name()
        backend = pg.getBackendName()
    return backend != "fake"


def exchange(gm: fx.GraphModule, mesh: MeshInfo) -> None:
    """Compares this rank's collective schedule with its groups' other ranks (a few small all_gathers).

    Call it on every rank at the same point (the runtime does, on a
    ParallelModule's first forward). Dry runs and torch's fake backend are
    skipped.

    Raises:
        GraphInvariantError: on every rank of a group whose schedules differ,
            naming the first differing collective as each rank has it.
    """
    if mesh.group_names is None:
        return
    sigs = collective_schedule(gm, mesh)
    device = _device(gm)
    for m, (dim, n) in enumerate(zip(mesh.names, mesh.sizes)):
        group = mesh.group_names[m]
        if n == 1 or not _exchangeable(group):
            continue
        mine = [s for s in sigs if s.mesh_dim == dim]
        count, digest = schedule_fingerprint(mine)
        prints = _gather(torch.tensor([count, digest], dtype=torch.int64, device=device), n, group)
        if bool((prints == prints[0]).all()):
            continue
        longest = int(prints[:, 0].max())
        hashes = torch.full((max(longest, 1),), -1, dtype=torch.int64)
        hashes[:len(mine)] = torch.tensor([_entry_hash(s) for s in mine], dtype=torch.int64)
        table = _gather(hashes.to(device), n, group)
        differs = (table != table[0]).any(dim=0).nonzero()
        i = int(differs[0]) if differs.numel() else longest
        what = str(mine[i]) if i < len(mine) else f"(nothing: this rank has only {len(mine)} collectives on {dim!r})"
        text = f"coordinate {list(mesh.coordinate) if mesh.coordinate else '?'}: {what}".encode()[:_TEXT_BYTES]
        buf = torch.zeros(_TEXT_BYTES, dtype=torch.uint8)
        buf[:len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        texts = _gather(buf.to(device), n, group).cpu()
        lines = [f"  group rank {k} at {bytes(row[row != 0].tolist()).decode(errors='replace')}"
                 for k, row in enumerate(texts)]
        raise GraphInvariantError(
            f"collective order differs across the ranks of mesh dim {dim!r} (group {group!r}): first difference "
            f"at collective #{i} on that dim:\n" + "\n".join(lines)
            + "\nrunning on would hang or silently combine unrelated tensors; every rank of a group must run "
              "the same graph (a rank-dependent pass or graph edit?). fxpar.analysis.invariants.check_ranks finds this "
              "statically given every rank's ParallelModule")
    log.debug("collective fingerprints agree on %s", mesh)
