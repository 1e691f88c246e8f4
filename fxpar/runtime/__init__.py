"""Execution: ParallelModule and PipelineModule (stages built from the split's layout), gradient
synchronisation, FSDP buckets and training utilities."""
