"""GPU checks of the executor (skipped without CUDA; run on the GPU machine).

- bf16: stronghold follows megatron-lm within bf16 noise;
- fp16: identical loss-scale skip decisions, including the initial overflow iterations;
- the GPU working set does not grow with the number of layers at a fixed window.
"""

import gc
import os
import subprocess
import sys

import pytest
import torch

from megatron.stronghold import arguments, training
from megatron.stronghold.logs import parse_log

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BF16_RTOL = 2e-2  # bf16 weights are rounded after each step; CPU vs GPU fp32 Adam differ by ulps
# Over the first iterations the runs agree to about 5e-6 (the two Adams' ulps have not yet flipped a bf16
# rounding that matters): held to 1e-3 there, which the bf16-master bug that parted the runs by 1% fails.
EARLY, EARLY_RTOL = 3, 1e-3


def assert_follows(got, ref):
    """Losses within 1e-3 over the first EARLY iterations, then within bf16's noise."""
    assert got.losses[:EARLY] == pytest.approx(ref.losses[:EARLY], rel=EARLY_RTOL)
    assert got.losses == pytest.approx(ref.losses, rel=BF16_RTOL)


def run(method, layers, extra=(), window=2, iters=20, hidden=256, heads=8, seq=128, micro_batch=4):
    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(seq), "--micro-batch-size", str(micro_batch), "--train-iters", str(iters),
            "--lr", "1e-3", "--lr-warmup-iters", "2", "--seed", "11", "--mock-data", "--log-interval", "5",
            "--offload-method", method, "--window-size", str(window), *extra]
    if method == "stronghold" and "--resident-layers" not in extra:
        argv += ["--resident-layers", "0"]  # stream every layer (the planner would keep these resident)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    history = training.train(arguments.parse_args(argv))
    history.peak_gpu = torch.cuda.max_memory_allocated()
    return history


def test_fp32_matches_megatron_on_gpu():
    ref = run("megatron-lm", 4)
    got = run("stronghold", 4)
    assert got.losses == pytest.approx(ref.losses, rel=1e-5)
    assert got.grad_norms == pytest.approx(ref.grad_norms, rel=1e-4)


def test_fp32_layer_major_with_accumulation_and_dropout_matches_megatron_on_gpu():
    """Four micro-batches per step, every layer streamed and run layer-major, dropout on: the masks
    follow (seed, iteration, micro-batch, layer), so the losses are megatron-lm's."""
    extra = ("--global-batch-size", "16")
    for more in ((), ("--recompute-granularity", "full")):
        ref = run("megatron-lm", 4, (*extra, *more))
        got = run("stronghold", 4, (*extra, *more))
        assert got.losses == pytest.approx(ref.losses, rel=1e-5)
        assert got.grad_norms == pytest.approx(ref.grad_norms, rel=1e-4)


def test_bf16_matches_megatron_within_bf16_noise():
    ref = run("megatron-lm", 4, ("--bf16",))
    got = run("stronghold", 4, ("--bf16",))
    assert_follows(got, ref)
    assert ref.losses[-1] < ref.losses[0] and got.losses[-1] < got.losses[0]


def test_bf16_remainders_change_no_bit_on_gpu():
    """The default bf16 host store (master as weights plus remainder) trains bit for bit as the whole
    fp32 master, with clipping."""
    split = run("stronghold", 4, ("--bf16", "--clip-grad", "0.5"))
    whole = run("stronghold", 4, ("--bf16", "--clip-grad", "0.5", "--no-store-param-remainders"))
    assert split.losses == whole.losses and split.grad_norms == whole.grad_norms


def test_bf16_moments_match_megatron_on_gpu():
    """fp32 compute with bf16 Adam moments: the host store's CPU kernel and the GPU's widened fused AdamW
    round the same fp32 updates; their fp32 ulps (CPU vs GPU Adam) flip a bf16 rounding now and then,
    which the bounds allow (ten times those of fp32 moments)."""
    flags = ("--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16")
    ref = run("megatron-lm", 4, flags)
    got = run("stronghold", 4, (*flags, "--resident-layers", "1"))
    print("bf16 moments, max relative difference: loss %.1e, grad norm %.1e" % (
        max(abs(a - b) / abs(a) for a, b in zip(ref.losses, got.losses)),
        max(abs(a - b) / abs(a) for a, b in zip(ref.grad_norms, got.grad_norms))))
    assert got.losses == pytest.approx(ref.losses, rel=1e-4)
    assert got.grad_norms == pytest.approx(ref.grad_norms, rel=1e-3)


def test_fp16_skips_the_same_iterations():
    extra = ("--fp16", "--initial-loss-scale", str(2.0 ** 40), "--hysteresis", "1")
    ref = run("megatron-lm", 4, extra)
    got = run("stronghold", 4, extra)
    assert any(ref.skipped), "the initial loss scale should overflow fp16 at least once"
    assert got.skipped == ref.skipped
    assert got.loss_scales == ref.loss_scales
    assert_follows(got, ref)


def peak_gpu_in_fresh_process(layers):
    """The summary's training peak, from a process of its own (earlier runs cannot leak into it)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, os.path.join(root, "pretrain_gpt.py"), "--num-layers", str(layers), "--hidden-size",
           "1024", "--num-attention-heads", "16", "--seq-length", "128", "--micro-batch-size", "1",
           "--train-iters", "3", "--bf16", "--mock-data", "--offload-method", "stronghold", "--window-size", "2",
           "--resident-layers", "0", "--recompute-granularity", "full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return parse_log(proc.stdout).summary["peak GPU memory (GiB)"] * 2 ** 30


def test_peak_gpu_memory_does_not_grow_with_layers():
    """16 vs 32 layers: 16 more layers may add their checkpointed inputs (16 x 256 KiB here) but not
    their model states: if they stayed on the GPU, their bf16 weights alone would add 16 x 24 MiB."""
    small, large = peak_gpu_in_fresh_process(16), peak_gpu_in_fresh_process(32)
    one_layer_weights = 12 * 1024 * 1024 * 2
    assert large - small < one_layer_weights, (small, large)


def test_the_plan_measures_this_gpu_and_caches_it(tmp_path, monkeypatch, capsys):
    """The first run measures the copy, CPU AdamW and layer rates (each plausible for a PCIe GPU host), the
    plan line prints them, and a second run reads them from the cache."""
    from megatron.stronghold.planner.machine import GpuProbe, measured_rates

    monkeypatch.setenv("STRONGHOLD_CACHE_DIR", str(tmp_path))
    run("stronghold", 4, iters=3)
    out = capsys.readouterr().out
    assert "> measuring the pinned copy rates on this machine" in out and "rates (measured on " in out
    run("stronghold", 4, iters=3)
    assert "> measuring" not in capsys.readouterr().out
    args = arguments.parse_args(["--num-layers", "4", "--bf16", "--hidden-size", "1024", "--num-attention-heads", "8"])
    rates = measured_rates(GpuProbe(args, torch.device("cuda"), 50304), args, 50304, (2, 8))
    assert 5e9 < rates.h2d < 200e9 and 5e9 < rates.d2h < 200e9
    assert 0 < rates.layer_forward < rates.layer_backward < 10 * rates.layer_forward
    assert rates.adam_rate(8) > rates.adam_rate(2) > 1e7
    assert 1e9 < rates.resident_step < 1e12 and 1e9 < rates.embedding_step < 1e12  # tens of bytes per parameter at a few TB/s


def test_megatron_offload_trains_like_megatron_and_their_checkpoints_cross(tmp_path):
    """megatron-core's optimizer CPU offload (half the optimizer on the CPU) follows megatron-lm within bf16
    noise; its checkpoint resumes under megatron-lm and the other way round."""
    bf16 = ["--bf16", "--optimizer-offload-fraction", "0.5"]
    reference = run("megatron-lm", 4, ["--bf16"], iters=10)
    offload = run("megatron-offload", 4, bf16, iters=10)
    assert_follows(offload, reference)
    saved = str(tmp_path / "offload")
    run("megatron-offload", 4, [*bf16, "--save", saved, "--exit-interval", "5"], iters=10)
    resumed = run("megatron-lm", 4, ["--bf16", "--load", saved], iters=10)
    assert resumed.losses == pytest.approx(offload.losses[5:], rel=BF16_RTOL)
    saved = str(tmp_path / "megatron")
    run("megatron-lm", 4, ["--bf16", "--save", saved, "--exit-interval", "5"], iters=10)
    back = run("megatron-offload", 4, [*bf16, "--load", saved], iters=10)
    assert back.losses == pytest.approx(reference.losses[5:], rel=BF16_RTOL)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_losses_respect_causality_on_gpu(tmp_path, packing):
    """tests/test_sft.py's check on the GPU's kernels (torch's choice for padded sequences and for packed
    ones with the conversation mask), by stronghold in the planner's placement, in the fine-tuning stage's
    precision and recompute."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from test_sft import sft_losses_respect_causality

    sft_losses_respect_causality(tmp_path, packing, extra=(
        "--offload-method", "stronghold", "--bf16", "--recompute-granularity", "full",
        "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16"))


@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_attention_kernels_match_the_causal_reference_on_gpu(grad, packed):
    """model.attend on the GPU's kernels (torch's choice, for one causal sequence and with the conversation
    mask), with the fine-tuning run's shapes (Llama-3-8B's 32 heads in 8 groups, 2 x 2048, bf16, inputs
    permuted from megatron-core's [s, b, heads, dim]), with and without autograd (training's and
    evaluation's modes): the output of every token equals fp32 attention over the tokens it may see."""
    from megatron.stronghold.model import attend, conversation_mask
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "tools"))
    from attention_check import reference as fp32_attention  # the card check's fp32 attention

    torch.manual_seed(0)
    s, b, heads, groups, dim = 2048, 2, 32, 8, 128
    query = torch.randn(s, b, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
    key, value = (torch.randn(s, b, groups, dim, device="cuda", dtype=torch.bfloat16, requires_grad=grad)
                  for _ in range(2))
    segments = (torch.arange(s, device="cuda") // 700).expand(b, s) if packed else None
    with torch.set_grad_enabled(grad):
        got = attend(query, key, value, segments).float()
    allowed = conversation_mask(segments if packed else torch.zeros(b, s, dtype=torch.long, device="cuda"))
    q, k, v = (t.detach().float().permute(1, 2, 0, 3) for t in (query, key.repeat_interleave(heads // groups, 2),
                                                                  value.repeat_interleave(heads // groups, 2)))
    reference = fp32_attention(q, k, v, allowed).permute(2, 0, 1, 3).reshape(s, b, heads * dim)
    assert (got - reference).abs().max().item() < 2e-2
