"""The planner: predict a plan's step time and memory on a device, and choose the mesh and plan.

    est = fxpar.estimate(model, (8, 8), ("fsdp", "tp"), example_inputs=(ids,), device="h100")
    ap = fxpar.autoplan(model, 64, example_inputs=(ids,), device="h100", memory_gib=80)
    pm = fxpar.parallelize(model, init_device_mesh("cuda", ap.mesh_shape, mesh_dim_names=ap.mesh_dim_names),
                           example_inputs=(ids,), plan=ap.plan)
"""

from fxpar.planner.devices import PROFILES, DeviceProfile, device_profile, measure_local
from fxpar.planner.predict import Estimate, estimate, estimate_module
from fxpar.planner.search import AutoPlan, Candidate, autoplan

__all__ = ["DeviceProfile", "PROFILES", "device_profile", "measure_local", "Estimate", "estimate",
           "estimate_module", "AutoPlan", "Candidate", "autoplan"]
