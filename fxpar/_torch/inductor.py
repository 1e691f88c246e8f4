"""inductor's scheduler: the comm / compute reordering pass fxpar's compiled graphs run.

inductor's own `reorder_compute_for_overlap` fills the time a collective is in
flight with compute only as long as its cost estimate says the collective is
still running; on CPU (and for extern matmuls) that estimate is 0, so it
overlaps nothing and pushes the weight-gradient matmuls of a tp backward to
the very end, behind the last all-reduce. `overlap_comms` runs the same pass
with a coarse relative cost (a collective outweighs a matmul, which outweighs
an elementwise kernel): each block's input-gradient all-reduce is then issued,
that block's weight-gradient matmuls run, and only then comes the wait.
"""

from __future__ import annotations

__all__ = ["overlap_comms", "collective_order"]

# Relative costs (arbitrary units): only their order matters to the greedy scheduler.
_COLLECTIVE, _GEMM, _OTHER = 1.0, 0.3, 0.01


def _estimate(snode) -> float:
    from torch._inductor import comms as _comms  # imported on first compile: inductor is heavy to import

    if _comms.contains_async_collective(snode):
        return _COLLECTIVE
    if _comms.contains_gemm_like(snode):
        return _GEMM
    return _OTHER


def overlap_comms(snodes: list) -> list:
    """A scheduler-node order that issues collectives early, waits late and runs independent compute between.

    An entry of inductor's `reorder_for_compute_comm_overlap_passes` (a torch.compile option); the cost
    estimate is patched for this pass only.

    Waits for: a public inductor scheduling hook with a pluggable cost model (torch._inductor.comms).
    """
    from torch._inductor import comms as _comms
    from torch._inductor import config as _config

    with _config.patch(estimate_op_runtime=_estimate):
        return _comms.reorder_compute_for_overlap(snodes)


def collective_order(snodes: list) -> list[tuple[str, tuple, tuple]]:
    """The collectives of a scheduler-node order (their waits left out), as (op, input sizes, constant args):
    what a rank issues, in the order inductor's reordering left them (`fxpar.verify.compiled_order`).

    Waits for: a public view of inductor's scheduled nodes (torch._inductor.scheduler / comms).
    """
    from torch._inductor import comms as _comms

    out = []
    for snode in snodes:
        for sub in snode.get_nodes():
            node = getattr(sub, "node", None)
            name = str(getattr(node, "python_kernel_name", "") or "")
            if node is None or not _comms.contains_collective(sub) or name.endswith("wait_tensor.default"):
                continue
            sizes = tuple(tuple(str(d) for d in i.get_size()) for i in getattr(node, "inputs", ()) if hasattr(i, "get_size"))
            out.append((name.replace("torch.ops.", ""), sizes, tuple(str(a) for a in getattr(node, "constant_args", ()))))
    return out
