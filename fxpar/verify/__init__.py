"""Numerical verification: a parallelized model against the original, outputs and every gradient.

`fxpar.verify(model, pm, *inputs, ...)` is the function (bound on the fxpar
package); this package holds it (`numerics`) with its report types.
"""

from fxpar.verify.report import BisectResult, TensorReport, VerifyReport, default_tolerances, fan_in, working_dtype
from fxpar.verify.numerics import verify

__all__ = ["TensorReport", "VerifyReport", "BisectResult", "verify", "default_tolerances", "fan_in", "working_dtype"]
