"""fxpar's pass library, importable as `fxpar.passes`.

One public pass per module, named like the module. The default pipeline, in
data-flow order: annotate_parameters -> split_linear_bias ->
propagate_sharding -> insert_collectives -> localize_shapes -> shard_parameters.
"""

from fxpar.passes.annotate_parameters import annotate_parameters
from fxpar.passes.insert_collectives import insert_collectives
from fxpar.passes.localize_shapes import localize_shapes
from fxpar.passes.propagate_sharding import propagate_sharding
from fxpar.passes.shard_parameters import shard_parameters
from fxpar.passes.split_linear_bias import split_linear_bias

__all__ = [
    "annotate_parameters",
    "split_linear_bias",
    "propagate_sharding",
    "insert_collectives",
    "localize_shapes",
    "shard_parameters",
]
