"""Shared fixtures: fake process groups for structure tests, hypothesis profiles.

Multi-rank numerics use `fxpar.testing.rank_pool` (real gloo processes).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings

from fxpar.testing import preload

os.environ.setdefault("FXPAR_CHECK", "1")

# Rank processes start with pytest, transformers and the model families most tests build already
# imported: the forkserver imports them once, instead of every fresh rank of every pool (and every
# pool restarted after a failed run) spending seconds on it. Skipped where transformers is missing.
preload("pytest", "transformers", "transformers.models.gpt2.modeling_gpt2",
        "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
        "transformers.models.bert.modeling_bert")

settings.register_profile(
    "ci", derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def fake_mesh(shape: tuple[int, ...], names: tuple[str, ...] | None = None, rank: int = 0):
    """A DeviceMesh on torch's fake backend: structure only, collectives return garbage."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world = 1
    for s in shape:
        world *= s
    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    return init_device_mesh("cpu", shape, mesh_dim_names=names)


@pytest.fixture
def make_fake_mesh():
    yield fake_mesh
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Cases moved to CI's slow run to keep the default run under 10 minutes on 2 cores; each path they cover
# keeps a default case (named after the '#'). Times: `pytest --durations` on this machine.
DEFAULT_RUN_SLOW = {
    "test_examples.py::test_gpt2_demo_verifies",  # 17 s; test_readme + test_custom_pass_unit_test_from_the_guide
    "test_examples.py::test_custom_pass_example_verifies",  # 9 s; test_custom_pass_unit_test_from_the_guide
    "test_examples.py::test_tp_mlp_demo_verifies",  # 8 s; test_data_parallel, test_transformers (tp2)
    "test_memory_prediction.py::test_step_peak_prediction_bounds_measured_peak[fsdp2]",  # 12 s; dp2 cases
    "test_pipeline_data_parallel.py::test_gpt2_trains_20_steps_like_one_process[dp2xpp2xtp2-1f1b]",  # 8 ranks
    "test_bigmodel.py::test_meta_model_init_load_save[dp2xtp2]",  # 10 s; [tp2], [fsdp2]
    "test_bigmodel.py::test_meta_model_init_load_save[fsdp3-uneven]",  # 8 s; test_uneven_shards
    "test_overlap.py::test_overlap_is_bit_equal_to_waiting[fsdp2-aot_eager]",  # 9 s; test_fsdp_compile_uneven
    "test_pipeline_numerics.py::test_every_schedule_matches_unsplit_model_float64[2-llama]",  # 8 s; [2-gpt2]
    "test_pipeline_numerics.py::test_pp2_tp2_transformers[llama]",  # 6 s; [gpt2]
    "test_pipeline_numerics.py::test_float32_schedules_match_unsplit_model[llama]",  # [gpt2]
    "test_fsdp_compile_uneven.py::test_driver_deadline_names_each_rank_and_where_it_is",  # 7 s; [eager] timeout
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[dp2-full]",
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[fsdp2-full]",
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[dp2-selective]",
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[fsdp2-selective]",
    "test_gqa_replicated_kv.py::test_saved_plan_reloads_the_same_layout",  # test_plan_io
    "test_gqa_replicated_kv.py::test_full_state_round_trip",  # test_mqa_on_two_gloo_ranks_..._state_dict
    "test_gqa_replicated_kv.py::test_composes_with_data_parallel",  # 3 s
    "test_mixed_precision.py::test_bf16_policy_keeps_fp32_weights_and_computes_in_bf16[fsdp4]",  # [dp2xtp2]
    "test_mixed_precision.py::test_bf16_policy_keeps_fp32_weights_and_computes_in_bf16[pp2xtp2]",  # [fsdp2xpp2]
    "test_mixed_precision.py::test_bf16_policy_keeps_fp32_weights_and_computes_in_bf16[fsdp2xtp2]",
    "test_convnets.py::test_convnet_equals_one_process[resnet-eval-fsdp2xtp2]",  # [resnet-train-fsdp2xtp2]
    "test_convnets.py::test_convnet_equals_one_process[resnet-train-dp2xtp2]",  # [resnet-eval-dp2xtp2]
    "test_verify.py::test_transformers_verify_and_bisect_names_a_planted_bug[qwen2]",  # [llama]: same family
    "test_verify.py::test_transformers_verify_and_bisect_names_a_planted_bug[titan]",  # test_titan
    "test_loss_parallel.py::test_hand_written_log_softmax_losses_run_on_vocab_shards[nll_of_flat_log_softmax_sum]",
    "test_loss_parallel.py::test_hand_written_log_softmax_losses_run_on_vocab_shards[gathered_log_probs]",
    "test_hsdp_memory.py::test_hsdp_frees_gathered_weights_after_forward_and_all_reduces_shards[param-waiting]",
    "test_hsdp_memory.py::test_hsdp_frees_gathered_weights_after_forward_and_all_reduces_shards[block-waiting]",
    "test_checkpoint.py::test_resume_on_another_mesh_equals_one_process[tp2xdp2]",  # [fsdp2xtp2]
    "test_planner.py::test_the_chosen_plan_runs_and_verifies[4]",  # [2]
    "test_cli.py::test_run_wraps_torchrun",  # test_run_names_the_failing_rank_and_its_root_cause[exception]
    "test_leftovers_plan_io.py::test_uneven_heads_plan_round_trips[3-2-2]",  # [3-2-1]
    "test_pipeline_data_parallel.py::test_gpt2_trains_in_float32_as_close_as_one_process",  # 11 s; float64 cases
    "test_planner_ep.py::test_autoplan_chooses_ep_where_it_pays_and_the_plan_runs",  # 5 s; its ep cost tests
    "test_async_tp.py::test_dp2_x_tp2_local_batches_are_exact",  # 5 s; test_split_is_exact_...
    "test_memory_prediction.py::test_step_peak_prediction_dp2[activation-bound]",  # [gradient-bound]
    "test_pipeline_encoder_decoder.py::test_encoder_decoder_pp2_gradients_equal_the_unsplit_model[t5]",  # [bart]
    "test_verify.py::test_transformers_verify_and_bisect_names_a_planted_bug[llama]",  # [gpt2], [bert]
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[pp2-full]",  # -selective
    "test_activation_checkpointing.py::test_gradients_bit_equal_to_no_checkpointing_float64[tp2-selective]",  # -full
    "test_hsdp_memory.py::test_hsdp_frees_gathered_weights_after_forward_and_all_reduces_shards[param-overlap]",
    # second round: CI's clean clone measured 661 s for the default run where this machine measured 546 s
    "test_checkpoint.py::test_state_dict_is_dtensors_keyed_by_original_fqns",  # 9 s; test_resume_on_another_mesh_*
    "test_planner.py::test_estimate_terms_follow_the_mesh",  # 6 s; test_estimate_memory_is_the_memory_model_...
    "test_bigmodel.py::test_meta_model_init_load_save[tp2]",  # 6 s; [fsdp2]
    "test_async_tp.py::test_gate_and_switches",  # 4 s; test_default_gate_splits_the_benchmark_size
    "test_memory_prediction.py::test_dry_run_shows_checkpointing_and_precision_in_memory",  # 5 s; test_dryrun
    "test_compile.py::test_compiled_graph_equals_eager_in_float64[dp2xtp2-aot_eager]",  # [tp2-inductor], [fsdp2-...]
    "test_mixed_precision.py::test_bf16_policy_keeps_fp32_weights_and_computes_in_bf16[fsdp2xpp2]",  # [dp2xtp2]
    "test_pipeline_data_parallel.py::test_gpt2_trains_20_steps_like_one_process[fsdp2xpp2-1f1b-gather-once]",
    "test_verify.py::test_transformers_verify_and_bisect_names_a_planted_bug[bert]",  # [gpt2]
    "test_transformers.py::test_automatic_plan_matches_original[qwen2-2]",  # [llama-2]: the same family
    "test_transformers.py::test_automatic_plan_matches_original[bert-2]",  # [gpt2-2], [llama-2]
    "test_convnets.py::test_convnet_equals_one_process[resnet-eval-dp2xtp2]",  # [resnet-train-fsdp2xtp2]
    "test_hsdp_memory.py::test_hsdp_mixed_precision_reduces_shards_in_float32_like_fsdp4",  # test_mixed_precision_hsdp
    "test_uneven_heads.py::test_gpt2_twelve_heads_on_tp8",  # 8 ranks; the tp2 uneven-heads cases
    "test_leftovers_plan_io.py::test_uneven_heads_from_a_saved_plan_are_exact",  # ..._plan_round_trips[3-2-1]
    # third round: the clean-clone default run measured 549-590 s with two 4-rank tests added
    "test_data_parallel.py::test_gpt2_trains_20_steps_like_one_process[fsdp2xtp2]",  # 9 s; [dp2xtp2], checkpoint
    "test_mixed_precision_rotary.py::test_every_op_runs_in_the_dtype_fsdp2_eager_runs_it[dp2xtp2-llama]",  # -qwen2
    "test_offload.py::test_offload_gradients_and_step_equal_no_offload_float64[tp2]",  # 6 s; [fsdp2]
    # fourth round: sequence-parallel async tp added 4 cases
    "test_async_tp.py::test_check_catches_a_value_read_before_its_wait[reduce_scatter]",  # [sp_all_gather]
    # and the clean-clone default run measured 599 s (this machine's working tree 537 s)
    "test_checkpoint.py::test_resume_on_another_mesh_equals_one_process[dp2xtp2]",  # 3 s; [fsdp2xtp2]
    "test_training.py::test_global_grad_norm_and_clipping[pp2xtp2]",  # 3 s; [dp2xtp2], test_pipeline_*
    "test_comm_volume.py::test_bytes_per_step_equal_the_megatron_formula[hf-llama-4]",  # [llama-4], [hf-llama-2]
    "test_comm_volume.py::test_bytes_per_step_equal_the_megatron_formula[hf-gpt2-4]",  # [gpt2-4], [hf-gpt2-2]
    "test_property_oracle.py::test_simulated_compile_is_parallelize_on_each_rank[mesh1]",  # [mesh0], [mesh2]
    "test_plan_io.py::test_saved_plan_compiles_to_the_identical_graph[mesh1]",  # [mesh0]
    # fifth round: the clean-clone default run measured 623 s on a box that ran last session's in 490 s
    "test_loss_parallel.py::test_captured_loss_on_dp_alone_is_the_exact_global_mean_without_gathering_logits",
    "test_pipeline_numerics.py::test_float32_schedules_match_unsplit_model[gpt2]",  # float64 schedule cases
    "test_pipeline_numerics.py::test_pp2_tp2_transformers[gpt2]",  # test_pp2_tp2_mlp_stack_sum_loss
    "test_mixed_precision.py::test_fsdp_gathers_bf16_and_reduce_scatters_fp32",  # bf16 [dp2xtp2], *_hsdp
    "test_mixed_precision_rotary.py::test_every_op_runs_in_the_dtype_fsdp2_eager_runs_it[fsdp2-qwen2]",  # -llama
    "test_compile.py::test_compiled_graph_equals_eager_in_float64[fsdp2-aot_eager]",  # test_fsdp_compile
    "test_pipeline_encoder_decoder.py::test_encoder_decoder_pp2_gradients_equal_the_unsplit_model[bart]",
    "test_checkpoint.py::test_resume_on_another_mesh_equals_one_process[fsdp2]",  # [fsdp2xtp2], [pp2]
    "test_post_accumulate_hooks.py::test_post_accumulate_grad_hooks_run_once_with_the_reduced_gradient[fsdp-pp]",
}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/", 1)[-1] in DEFAULT_RUN_SLOW:
            item.add_marker(pytest.mark.slow)
