"""The compiler: the pass manager and the compile path from a model to a runtime module.

`compile_model` captures a model, runs the pass pipeline (`default_passes`)
under the `PassManager` with fxpar's invariant checks, and wraps the result
in the runtime module that executes it.
"""

from fxpar.compiler.compile import DEFAULT_CHECKS, SUPPORTED_DIMS, PassManager, compile_model, default_passes
from fxpar.compiler.pass_manager import PassRecord

__all__ = ["compile_model", "default_passes", "DEFAULT_CHECKS", "SUPPORTED_DIMS", "PassManager", "PassRecord"]
