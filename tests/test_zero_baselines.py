"""ZeRO-Offload and ZeRO-Infinity (through DeepSpeed) train like megatron-lm from the same seed.

Each ZeRO run is compared iteration by iteration with the megatron-lm run of the same flags: same
initial weights, data, dropout masks, learning-rate schedule, weight-decay groups, clipping and
gradient accumulation. In fp32 the only differences are rounding (DeepSpeedCPUAdam against torch's
fused AdamW, a different summation order of the gradient norm): measured on CPU over 8 iterations,
at most 1.7e-7 relative on the losses and 3.1e-6 on the grad norms (on an H200: 4.8e-7 and 6.3e-6
at 4 layers, hidden 256). Tolerances: 1e-5 on the losses, 2e-5 on the grad norms; a weight-decay
group gone wrong moves them by 3e-5 and 1e-3, so both catch it.

On a machine without CUDA, DeepSpeed runs on its CPU accelerator (DS_ACCELERATOR=cpu, gloo). Its
CPU Adam and shared-memory communication ops are compiled on first use (about a minute on 2 cores)
into TORCH_EXTENSIONS_DIR; unless that is set, this file points it at `<sys.prefix>/torch_extensions`,
the CI's fresh .venv, so the build happens once per CI run (and per virtual environment) and
every later process of the run loads it from there.
"""
import math
import os
import sys

import pytest

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
_cache = os.path.join(sys.prefix, "torch_extensions")
if os.access(sys.prefix, os.W_OK):
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", _cache)

import deepspeed  # noqa: E402,F401  (after DS_ACCELERATOR: it picks its accelerator on import)

from megatron.stronghold import arguments, distributed, training  # noqa: E402

METHODS = ("zero-offload", "zero-infinity")
RTOL = 1e-5  # fp32, relative: losses
NORM_RTOL = 2e-5  # fp32, relative: grad norms (a norm amplifies the weights' rounding differences)
FP16_RTOL = 1e-4  # fp16 compute: rounding of half-precision activations and gradients

TINY = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--train-iters", "8", "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "2",
    "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--log-interval", "4", "--seed", "1234",
]
# Clip thresholds chosen from the megatron-lm runs so that clipping fires on some iterations and
# not on others (each test checks that it does).
CASES = {
    "one-micro-batch": ["--global-batch-size", "2", "--clip-grad", "2.1"],
    "accumulate-2": ["--global-batch-size", "4", "--clip-grad", "1.6"],
}

_histories = {}


def train(method, extra):
    key = (method, tuple(extra))
    if key not in _histories:
        _histories[key] = training.train(arguments.parse_args(TINY + extra + ["--offload-method", method]))
    return _histories[key]


def max_relative(values, reference):
    worst = 0.0
    for value, ref in zip(values, reference, strict=True):
        if math.isnan(ref):
            assert math.isnan(value), (values, reference)
            continue
        worst = max(worst, abs(value - ref) / abs(ref))
    return worst


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.integration
def test_zero_trains_like_megatron(method, case):
    extra = CASES[case]
    ref = train("megatron-lm", extra)
    zero = train(method, extra)

    clip = float(extra[extra.index("--clip-grad") + 1])
    assert any(n > clip for n in ref.grad_norms) and any(n < clip for n in ref.grad_norms), ref.grad_norms
    assert zero.lrs == ref.lrs
    assert zero.skipped == ref.skipped == [False] * len(ref.losses)
    loss_diff = max_relative(zero.losses, ref.losses)
    norm_diff = max_relative(zero.grad_norms, ref.grad_norms)
    print(f"{method} {case}: max relative difference: loss {loss_diff:.2e}, grad norm {norm_diff:.2e}")
    assert loss_diff <= RTOL, (zero.losses, ref.losses)
    assert norm_diff <= NORM_RTOL, (zero.grad_norms, ref.grad_norms)
    assert zero.losses[-1] < zero.losses[0]  # it trains


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.integration
def test_zero_fp16_skips_and_loss_scale_like_megatron(method, monkeypatch):
    """fp16 with dynamic loss scaling: the first steps overflow at a huge initial scale and are
    skipped, the scale halves (after the hysteresis) and grows after --loss-scale-window clean
    steps, all as megatron-lm does. DeepSpeed's CPU accelerator declines fp16 (its CPU kernels are
    slow, not wrong); the test lifts that flag to check the loss-scale logic on CPU as well."""
    if not torch.cuda.is_available():
        from deepspeed.accelerator import get_accelerator

        monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)
    extra = ["--global-batch-size", "4", "--clip-grad", "1.0", "--fp16",
             "--initial-loss-scale", str(2.0 ** 20), "--loss-scale-window", "3"]
    ref = train("megatron-lm", extra)
    zero = train(method, extra)
    assert any(ref.skipped) and not all(ref.skipped), ref.skipped
    assert zero.skipped == ref.skipped
    assert zero.loss_scales == ref.loss_scales
    assert zero.lrs == ref.lrs
    assert max_relative(zero.losses, ref.losses) <= FP16_RTOL, (zero.losses, ref.losses)
    assert max_relative(zero.grad_norms, ref.grad_norms) <= FP16_RTOL, (zero.grad_norms, ref.grad_norms)


@pytest.mark.unit
def test_fp16_refused_where_deepspeed_has_none(capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("without a CUDA GPU only: DeepSpeed supports fp16 on CUDA")
    # Whether DeepSpeed's CPU accelerator takes fp16 depends on the CPU (oneDNN fp16: AVX512-FP16 or
    # AMX-FP16); the refusal is tested on one that does not, whatever CPU runs the test.
    from deepspeed.accelerator import get_accelerator
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: False)
    status = training.main(TINY + ["--fp16", "--train-iters", "3", "--offload-method", "zero-offload"])
    assert status == 2
    assert "--fp16 is not supported by DeepSpeed" in capsys.readouterr().err


@pytest.mark.integration
def test_zero_infinity_moves_matrices_to_host():
    """ZeRO-3 partitions every matrix into host memory (fetched per use) and keeps the vectors
    resident; the optimizer has Megatron's two weight-decay groups, driven by the scheduler."""
    from megatron.stronghold.methods.zero import build_zero_method
    from megatron.stronghold.model import build_model
    from megatron.stronghold.optim import lr_scheduler

    args = arguments.parse_args(TINY + ["--offload-method", "zero-infinity"])
    device = distributed.pick_device()
    distributed.init_distributed(device)
    torch.manual_seed(args.seed)
    model = build_model(args, 256)
    method = build_zero_method(args, model, device, torch.float32)
    try:
        for name, param in model.named_parameters():
            assert param.ds_tensor.device.type == "cpu", name
            matrix = len(param.ds_shape) == 2
            assert param.ds_persist != matrix, f"{name}: only vectors stay resident once fetched"
            if matrix:
                assert param.numel() == 0, f"{name} is not partitioned"
        groups = method.optimizers[0].param_groups
        assert [g["wd_mult"] for g in groups] == [1.0, 0.0]
        lr_scheduler(args, method.optimizers)  # sets lr and weight decay from the schedule
        assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
        assert method.learning_rate() == groups[0]["lr"] == 0.0  # warmup starts at zero
        pinned = method.stats()["pinned bytes"]
        # ZeRO-Infinity pins its offloaded parameters and optimizer states; without CUDA nothing is pinned
        assert pinned > 0 if torch.cuda.is_available() else pinned == 0
    finally:
        method.shutdown()
