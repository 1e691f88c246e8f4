"""AOT autograd's joint graph: a pass run on it before the partitioner, and the recompute tags it reads.

fxpar's compiled FSDP (`fxpar.ops.traceable_fsdp`) re-gathers parameters in the
backward instead of saving them (FSDP's reshard_after_forward), as SimpleFSDP
does: a pass on the joint forward + backward graph tags the parameter
all-gathers MUST_RECOMPUTE, and the min-cut partitioner then recomputes them in
the backward graph rather than saving their outputs.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch.fx as fx
import torch.fx.traceback as _fx_traceback
from torch._functorch import config as _functorch_config
from torch.utils.checkpoint import CheckpointPolicy

__all__ = ["joint_graph_pass", "tag_recompute", "annotate_traced", "traced_annotation"]

# A region id above any activation-checkpoint region's: the partitioner saves a tagged node whose user is
# tagged in a later region (cleanup_recompute_tags), which must never split a gather from its unpacking.
_REGION = 100000


@contextlib.contextmanager
def joint_graph_pass(fn: Callable[[fx.GraphModule], None]) -> Iterator[None]:
    """Runs `fn(joint_graph_module)` on every joint graph AOT autograd builds inside the block.

    Scoped to the block (torch's config is restored after it): compiles elsewhere are untouched.

    Waits for: a public joint-graph pass hook in torch.compile (torch._functorch.config.joint_custom_pass).
    """
    def run(gm: fx.GraphModule, joint_inputs) -> fx.GraphModule:
        fn(gm)
        gm.recompile()
        return gm

    with _functorch_config.patch(joint_custom_pass=run):
        yield


def tag_recompute(node: fx.Node, *, save: bool = False) -> None:
    """Tags a joint-graph node for the partitioner: recomputed in the backward (or always saved with save=True).

    Waits for: a public recompute annotation (node.meta["recompute"] / ["ac_graph_id"] are the partitioner's).
    """
    node.meta["recompute"] = CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.MUST_RECOMPUTE
    node.meta["ac_graph_id"] = _REGION


def annotate_traced(key: str) -> contextlib.AbstractContextManager:
    """Inside, the nodes dynamo and AOT autograd trace carry `key` (read back with `traced_annotation`).

    fxpar's compiled FSDP marks the root unit's gather with it, so the joint-graph pass can tell it apart.
    Waits for: a stable annotation API (torch.fx.traceback.annotate says it is not backward compatible)."""
    return _fx_traceback.annotate({key: True})


def traced_annotation(node: fx.Node, key: str) -> bool:
    """Whether a joint-graph node was traced inside `annotate_traced(key)`."""
    return bool((node.meta.get("custom") or {}).get(key))
