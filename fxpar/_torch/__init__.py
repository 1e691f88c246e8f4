"""The one seam between fxpar and torch's private APIs.

Every use of a private torch name (a leading underscore in a module, class,
function or attribute that torch does not document as public) lives in one
module here, one per torch area, each with a comment naming the public API
it waits for. The rest of fxpar imports these wrappers, so a torch upgrade
is one folder to read; `tests/test_layering.py` keeps it that way.

    c10d        process groups by name, functional collective ops, autograd callbacks
    dispatch    fake tensors, dispatch modes and keys
    fx          pytree in/out code generation of exported graphs, pytree helpers, higher-order ops
    pipelining  torch.distributed.pipelining's schedule IR and schedule internals
    placements  DTensor placements not yet public (_StridedShard)
    inductor    the comm / compute reordering pass of compiled graphs
"""
