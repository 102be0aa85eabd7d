"""DeepSpeed configurations of the two ZeRO baselines, as Python dicts built from the trainer's flags.

Both are tuned as a careful DeepSpeed user would tune them for one or a few GPUs, so the comparison
with StrongHold is fair: DeepSpeedCPUAdam (fused, vectorised), pinned host memory, communication
overlapped with compute, and buckets sized from the model rather than left at defaults meant for
another scale. The numerics follow the trainer's flags (batch sizes, clipping, precision) so that a
ZeRO run trains like the Megatron-LM run of the same seed; see `zero.py` for what is driven from
outside DeepSpeed (learning-rate schedule, weight-decay groups, fp16 loss scale).
"""

import copy

MiB_ELEMENTS = 1 << 20


def layer_parameters(args) -> int:
    """Parameters of one GPT transformer layer: QKV + projection + two MLP matrices, biases, norms."""
    h, ffn = args.hidden_size, args.ffn_hidden_size
    return 4 * h * h + 2 * h * ffn + 9 * h + ffn


def _elements(n: float, floor: int, ceiling: int) -> int:
    """A bucket size in elements, clamped and rounded to a multiple of 1 Mi elements: DeepSpeed
    wants bucket sizes divisible by its alignment factor, and round sizes read better in logs."""
    n = max(floor, min(ceiling, int(n)))
    return max(MiB_ELEMENTS, (n + MiB_ELEMENTS - 1) // MiB_ELEMENTS * MiB_ELEMENTS)


def precision_config(args) -> dict:
    if args.fp16:
        return {
            "fp16": {
                "enabled": True,
                # A static scale inside DeepSpeed: the scale actually used is set before every step
                # from the trainer's LossScaler (Megatron-LM's rule) through override_loss_scale.
                # DeepSpeed's own dynamic scaler grows one clean step later than Megatron's and
                # raises an exception at the minimum scale where Megatron keeps skipping steps.
                "loss_scale": float(args.initial_loss_scale),
                # Inputs are integer token ids: nothing to cast.
                "auto_cast": False,
            },
            # Accumulate micro-batch gradients in fp32 where the ZeRO stage supports it, as
            # Megatron-LM's fp32 main grads do.
            "data_types": {"grad_accum_dtype": "fp32"},
        }
    if args.bf16:
        return {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    return {}


def base_config(args) -> dict:
    return {
        # Megatron's batch flags: global = micro x data-parallel x micro-batches per step.
        "train_batch_size": args.global_batch_size,
        "train_micro_batch_size_per_gpu": args.micro_batch_size,
        "gradient_accumulation_steps": args.num_microbatches,
        # Global L2-norm clipping with Megatron-LM's coefficient clip / (norm + 1e-6) (DeepSpeed's
        # ZeRO optimizers divide by (norm + 1e-6) / clip when that exceeds one: the same thing).
        "gradient_clipping": float(args.clip_grad),
        # The trainer prints Megatron-LM's log lines; DeepSpeed's own would interleave with them.
        "steps_per_print": 2 ** 31 - 1,
        # Its timers synchronise the device around every phase of every step: slower, so off.
        "wall_clock_breakdown": False,
        "memory_breakdown": False,
        # Offloading must run on the fused C++ CPU Adam, never a slow torch optimizer by mistake.
        "zero_force_ds_cpu_optimizer": True,
        "zero_allow_untested_optimizer": False,
        **precision_config(args),
    }


def zero_offload_config(args) -> dict:
    """ZeRO-Offload: ZeRO stage 2 with the optimizer (fp32 master weights, Adam moments, fp32
    gradients) in host memory and stepped by DeepSpeedCPUAdam; compute-dtype weights stay on GPU."""
    layer = layer_parameters(args)
    bucket = _elements(4 * layer, floor=50 * MiB_ELEMENTS, ceiling=500_000_000)
    config = base_config(args)
    config["zero_optimization"] = {
        "stage": 2,
        "offload_optimizer": {
            "device": "cpu",
            # Pinned (page-locked) host buffers for the fp32 gradient partition and the weights
            # copied back: device<->host copies then run as asynchronous DMA at full PCIe speed
            # instead of being staged through a pageable bounce buffer that blocks the host.
            "pin_memory": True,
        },
        # Gradients are copied into one contiguous buffer as backward produces them: no
        # fragmentation, and each bucket goes to the host as a single transfer (offload needs it).
        "contiguous_gradients": True,
        # Reduce (across GPUs) and copy each full gradient bucket to the host on a side stream
        # while backward goes on, instead of after it.
        "overlap_comm": True,
        # Each rank receives only the gradient partition it steps: half the traffic of all-reduce.
        "reduce_scatter": True,
        # About four transformer layers of gradients per bucket (at least 50 Mi, at most 500 M
        # elements): large enough that every copy saturates PCIe and per-bucket overheads are few,
        # small enough that the overlap_comm double buffers (compute dtype) leave GPU memory for
        # the model; DeepSpeed's default (500 M) costs several GiB at any model size.
        "reduce_bucket_size": bucket,
        # Gathering the updated weights after the step, in buckets of the same size (a no-op copy
        # on one GPU).
        "allgather_bucket_size": bucket,
        # With several GPUs, spreads the gradient copies to the host over the ranks in fine
        # slices so that they proceed in parallel; nothing changes on one GPU.
        "round_robin_gradients": True,
    }
    return config


def zero_infinity_config(args) -> dict:
    """ZeRO-Infinity (on CPU memory, no NVMe): ZeRO stage 3 with compute-dtype parameters and the
    optimizer in pinned host memory; each layer's weights are fetched to the GPU when it runs."""
    layer = layer_parameters(args)
    config = base_config(args)
    config["zero_optimization"] = {
        "stage": 3,
        "offload_param": {
            "device": "cpu",
            # Parameters live pinned on the host, so the per-layer fetches before forward and
            # backward are asynchronous DMA that overlaps compute.
            "pin_memory": True,
        },
        "offload_optimizer": {"device": "cpu", "pin_memory": True},
        # Gradient flushes to the host and parameter prefetches run on side streams.
        "overlap_comm": True,
        "contiguous_gradients": True,
        # Gradients leave the GPU about one layer at a time: each copy saturates PCIe, and a
        # layer's gradient buffer is free again before the next layer's backward ends.
        "reduce_bucket_size": _elements(layer, floor=16 * MiB_ELEMENTS, ceiling=500_000_000),
        # Prefetch two layers ahead of the one computing (DeepSpeed's default, 50 M elements, is
        # less than one layer at hidden 2048 or above, so the GPU would wait for every fetch).
        # Two layers give the copies slack against PCIe jitter, like StrongHold's window.
        "stage3_prefetch_bucket_size": _elements(2 * layer, floor=16 * MiB_ELEMENTS, ceiling=2_000_000_000),
        # At most this many gathered parameters on the GPU at once: at least the prefetched layers
        # plus the one computing; DeepSpeed's 1e9 default is kept when larger, since GPU memory is
        # not what limits these runs (host memory for the optimizer states is).
        "stage3_max_live_parameters": max(1_000_000_000, 4 * layer),
        # A parameter used again within this many elements of fetches (forward of the last layers,
        # then their backward right away) stays on the GPU instead of going out and back.
        "stage3_max_reuse_distance": max(1_000_000_000, 4 * layer),
        # Parameters smaller than this stay resident on the GPU: fetching thousands of tiny
        # tensors one by one costs more in latency than they take in memory. DeepSpeed's 1e5
        # keeps the vectors (biases, norms: at most ffn elements) and moves every matrix at real
        # sizes; capped at 1% of a layer, the same split holds for the toy models of the tests.
        "stage3_param_persistence_threshold": min(100_000, layer // 100),
        # The CPU optimizer steps the flat fp32 partition in sub-groups of this many elements;
        # one large sub-group keeps DeepSpeedCPUAdam's vectorised loop long (the default).
        "sub_group_size": 1_000_000_000,
        "stage3_gather_16bit_weights_on_model_save": False,
    }
    return config


CONFIGS = {"zero-offload": zero_offload_config, "zero-infinity": zero_infinity_config}


def deepspeed_config(method: str, args) -> dict:
    return copy.deepcopy(CONFIGS[method](args))
