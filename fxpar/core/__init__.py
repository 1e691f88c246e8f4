"""The core: what every layer above shares and nothing below it needs.

errors (the FxparError hierarchy), config (the one place that reads the
environment), mesh (MeshInfo), plan (Plan, TPStyle), spec (TensorSpec,
NodeInfo under node.meta["fxpar"]), pass_api (the pass protocol), stages
(the pipeline stage layout as data), dataflow (which values carry a
gradient), fmt (sizes for reports). Imports only torch and fxpar._torch.
"""
