"""The run's configuration: every command-line flag and the values derived from them, typed and
frozen. arguments.parse_args builds it once; nothing writes into it afterwards (assigning a field
raises dataclasses.FrozenInstanceError). What the run settles later travels beside it, explicitly:
the planner's placement (planner.Plan), the checkpoint to resume from (checkpointing.Resume), the
tokenizer's vocabulary (tokenizer.Vocabulary).

The fields keep Megatron-LM's flag names (`--hidden-size` is `hidden_size`), so code reads
`args.hidden_size` as in Megatron-LM; the groups below are the --help groups.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Config:
    # model (defaults filled by parse_args: ffn_hidden_size, kv_channels, num_query_groups,
    # max_position_embeddings)
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    seq_length: int
    max_position_embeddings: int
    hidden_dropout: float
    attention_dropout: float
    untie_embeddings_and_output_weights: bool
    kv_channels: int
    group_query_attention: bool
    num_query_groups: int
    qk_layernorm: bool
    normalization: str
    norm_epsilon: float
    swiglu: bool
    disable_bias_linear: bool
    add_qkv_bias: bool
    position_embedding_type: str
    rotary_base: int
    rotary_percent: float
    openai_gelu: bool
    make_vocab_size_divisible_by: int
    use_cpu_initialization: bool

    # batch and schedule (global_batch_size, lr_decay_iters and lr_warmup_iters filled)
    micro_batch_size: int
    global_batch_size: int
    train_iters: int
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_warmup_iters: int
    lr_warmup_fraction: Optional[float]
    lr_decay_iters: int
    weight_decay: float
    clip_grad: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    seed: int

    # precision
    fp16: bool
    bf16: bool
    initial_loss_scale: float
    min_loss_scale: float
    loss_scale_window: int
    hysteresis: int
    store_param_remainders: bool  # what the run does: the flag, and bf16
    use_precision_aware_optimizer: bool
    exp_avg_dtype: str
    exp_avg_sq_dtype: str
    main_grads_dtype: str

    # activation recompute
    recompute_granularity: Optional[str]
    recompute_method: Optional[str]  # None: uniform, or the planner's choice for resident layers
    recompute_num_layers: int

    # logging and evaluation
    log_interval: int
    eval_interval: int
    eval_iters: int
    manual_gc: bool
    manual_gc_interval: int

    # tensorboard
    tensorboard_dir: Optional[str]
    tensorboard_log_interval: int
    tensorboard_queue_size: int
    log_timers_to_tensorboard: bool
    log_memory_to_tensorboard: bool

    # data (mock_data is True without --data-path; tokenizer_type filled)
    data_path: Optional[tuple]
    mock_data: bool
    sft: bool  # chat data with loss masks (sft.py)
    sft_packing: bool  # several conversations per sequence, each attending only to itself
    split: str
    tokenizer_type: str
    tokenizer_model: Optional[str]
    vocab_file: Optional[str]
    merge_file: Optional[str]
    vocab_size: Optional[int]
    data_cache_path: Optional[str]

    # parallelism
    tensor_model_parallel_size: int

    # offloading: the user's requests; the planner's settled values are in planner.Plan
    offload_method: str
    window_size: Optional[int]
    resident_layers: Optional[int]
    cpu_optimizer_threads: Optional[int]
    refresh_machine_rates: bool
    optimizer_offload_fraction: Optional[float]  # megatron-offload; None: its pre-flight check picks

    # checkpointing and run control (exit_on_nonfinite_iters filled)
    save: Optional[str]
    save_interval: Optional[int]
    load: Optional[str]
    finetune: bool
    override_opt_param_scheduler: bool
    use_checkpoint_opt_param_scheduler: bool
    ckpt_step: Optional[int]
    exit_interval: Optional[int]
    exit_on_nonfinite_iters: int

    # derived from the flags and the launch (torchrun's WORLD_SIZE and RANK)
    world_size: int
    data_parallel_size: int
    data_parallel_rank: int
    num_microbatches: int  # micro-batches per optimizer step and data-parallel rank
    params_dtype_name: str  # "fp32", "bf16" or "fp16"

    @property
    def params_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype_name]

    @property
    def moment_dtypes(self) -> tuple:
        """(exp_avg, exp_avg_sq) torch dtypes of every per-parameter method's Adam state."""
        return DTYPES[self.exp_avg_dtype], DTYPES[self.exp_avg_sq_dtype]

    @property
    def main_grads_torch_dtype(self) -> torch.dtype:
        """What a step's gradients are summed in on the GPU over its micro-batches (Megatron's main grads)."""
        return DTYPES[self.main_grads_dtype]

    @property
    def may_step_early(self) -> bool:
        """Whether streamed layers step as their gradients arrive (executor/speculative.py): where the
        global norm cannot change a step (no clipping, no fp16 loss scaling) and the one wrong guess,
        on non-finite gradients, ends the run without a save (--exit-on-nonfinite-iters 1)."""
        return self.clip_grad == 0 and not self.fp16 and self.exit_on_nonfinite_iters == 1

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> "Config":
        """The Config of a parsed and validated namespace (arguments.parse_args)."""
        values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
        if values["data_path"] is not None:
            values["data_path"] = tuple(values["data_path"])
        return cls(**values)
