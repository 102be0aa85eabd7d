"""The planner: byte counts, the choice of resident layers, and refusing what cannot fit."""

import os
import subprocess
import sys
import time

import pytest

from megatron.stronghold import arguments
from megatron.stronghold.planner import (GiB, DoesNotFit, ModelCosts, layers_that_fit, make_plan, megatron_check,
                                         zero_check)
from megatron.stronghold.planner.costs import zero_bytes

pytestmark = pytest.mark.unit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def costs(layers=64, *flags):
    args = arguments.parse_args(["--num-layers", str(layers), "--bf16", *flags])
    return ModelCosts.of(args, 50304)


def test_layer_size_and_bytes_per_parameter():
    c = costs()
    assert c.layer_params == 12 * 2048 ** 2 + 13 * 2048  # the paper's 50M-parameter layer
    assert c.host_bytes_per_param == 14  # bf16: master as a remainder + Adam, pinned weights + gradient
    assert c.resident_bytes_per_param == 16
    assert costs(8, "--no-store-param-remainders").resident_bytes_per_param == 18
    assert costs(8, "--global-batch-size", "8").host_bytes_per_param == 14  # the sum stays on the device
    assert costs(8, "--no-store-param-remainders").host_bytes_per_param == 16  # the fp32 master whole
    assert costs(8, *BF16_MOMENTS).host_bytes_per_param == 10
    assert costs(8, *BF16_MOMENTS).resident_bytes_per_param == 12


BF16_MOMENTS = ("--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16")


def test_smaller_layouts_admit_more_parameters():
    """H200- and H100-sized budgets (139 / 78.7 GiB free GPU, 119 GiB host), hidden 2048, the paper's batch:
    the exact remainders admit 1.10x the parameters of the whole fp32 masters or more (1.12x), bf16
    moments 1.45x or more (1.48x, 1.52x)."""
    for gpu in (139 * GiB, int(78.7 * GiB)):
        def capacity(*flags):
            c = costs(1, *flags)
            return layers_that_fit(c, gpu, 119 * GiB, "stronghold") * c.layer_params + c.other_params
        whole = capacity("--no-store-param-remainders")
        assert capacity() >= 1.10 * whole
        assert capacity(*BF16_MOMENTS) >= 1.45 * whole


def test_streamed_layers_keep_one_boundary_per_layer_and_micro_batch():
    """Layer-major with recompute: (S + 3) k boundaries of s b h (inputs, gradients at two boundaries)
    and one layer's activations of one micro-batch."""
    c = costs(32, "--global-batch-size", "64", "--recompute-granularity", "full")
    a = 2 * 1024 * 4 * 2048  # bf16 hidden state of a micro-batch of 4
    assert c.microbatches == 16 and c.hidden_state == a
    assert c.streamed_activations(32, recompute=True) == (32 + 3) * 16 * a + 17 * a
    plan = make_plan(c, gpu_free=140 * GiB, host_free=120 * GiB, resident=0)
    assert plan.streamed_recompute and plan.boundary_bytes == c.streamed_activations(32, True)


def test_streamed_layers_keep_their_activations_only_where_they_fit():
    """Without --recompute-granularity full the plan keeps the streamed layers' activations when
    they fit (no recompute: a quarter less compute) and keeps only their inputs when they do not."""
    one = costs(32, "--global-batch-size", "4")  # the paper's batch: 32 x 17 boundaries, 17 GiB
    assert not make_plan(one, gpu_free=140 * GiB, host_free=120 * GiB, resident=0).streamed_recompute
    many = costs(32, "--global-batch-size", "64")  # 16 micro-batches: 272 GiB of activations
    plan = make_plan(many, gpu_free=140 * GiB, host_free=120 * GiB, resident=0)
    assert plan.streamed_recompute and plan.gpu_bytes <= 140 * GiB


def test_boundaries_go_to_host_memory_only_where_no_placement_holds_them():
    """200 layers (10 B parameters), global batch 1024 at micro-batch 4: 256 micro-batches, so each
    streamed layer's inputs take 4 GiB and no placement holds them on a 140 GiB GPU; in pinned host
    memory they leave 5 micro-batch sets on the GPU."""
    big = costs(200, "--global-batch-size", "1024", "--recompute-granularity", "full")
    with pytest.raises(DoesNotFit):  # too little host memory for them as well
        make_plan(big, gpu_free=140 * GiB, host_free=60 * GiB)
    plan = make_plan(big, gpu_free=140 * GiB, host_free=400 * GiB)
    k, a = big.microbatches, big.hidden_state
    streamed = 200 - plan.resident
    assert streamed > 0
    assert plan.boundaries_on_host and plan.boundary_bytes == streamed * k * a
    assert "boundaries in pinned host memory" in plan.describe(big)
    assert plan.gpu_bytes <= 140 * GiB and plan.host_bytes >= streamed * k * a
    assert big.streamed_activations(streamed, True, on_host=True) == 5 * k * a + 17 * a
    small = costs(200, "--global-batch-size", "64", "--recompute-granularity", "full")
    assert not make_plan(small, gpu_free=140 * GiB, host_free=400 * GiB).boundaries_on_host
    assert not make_plan(big, gpu_free=None, host_free=2000 * GiB).boundaries_on_host  # no GPU


def test_the_prediction_counts_every_micro_batch():
    """At a real batch the step is compute-bound (the link and CPU work do not grow with the
    micro-batches): twice the micro-batches, about twice the iteration."""
    plan = lambda batch: make_plan(costs(32, "--recompute-granularity", "full", "--global-batch-size", batch),  # noqa: E731
                                   140 * GiB, 200 * GiB, resident=0)
    assert plan("128").predicted_s / plan("64").predicted_s == pytest.approx(2, rel=0.05)
    assert plan("4").predicted_s < plan("64").predicted_s / 3


def test_everything_resident_when_it_fits():
    plan = make_plan(costs(16), gpu_free=140 * GiB, host_free=100 * GiB)
    assert (plan.resident, plan.window) == (16, 0)


def test_only_what_does_not_fit_is_streamed():
    c = costs(200, "--recompute-granularity", "full")
    plan = make_plan(c, gpu_free=80 * GiB, host_free=120 * GiB)
    assert 0 < plan.resident < 200 and plan.window == 4
    assert plan.gpu_bytes <= 80 * GiB and plan.host_bytes <= 120 * GiB
    assert not plan.boundaries_on_host
    # one more resident layer fits only with the streamed layers' inputs moved to host memory,
    # which the planner does not choose while a placement holds them on the GPU
    assert make_plan(c, gpu_free=80 * GiB, host_free=120 * GiB, resident=plan.resident + 1).boundaries_on_host
    with pytest.raises(DoesNotFit):
        make_plan(c, gpu_free=80 * GiB, host_free=120 * GiB, resident=200)


@pytest.mark.parametrize("gpu_free", [78.6 * GiB, 139 * GiB])
def test_the_gpu_margin_is_a_fixed_reserve_whatever_the_card(gpu_free):
    """The counted bytes match the measured peak; what they leave out (workspaces, allocator slack)
    does not grow with the card, so the plan fills the free memory less the reserve to within one
    resident layer on an 80 GB and a 141 GB card alike."""
    c = costs(400, "--recompute-granularity", "full")
    plan = make_plan(c, gpu_free=int(gpu_free), host_free=500 * GiB)
    one_layer = c.layer_params * c.resident_bytes_per_param
    assert 0 <= gpu_free - plan.gpu_bytes < one_layer


def test_user_choice_overrides_the_plan():
    plan = make_plan(costs(16), gpu_free=140 * GiB, host_free=100 * GiB, resident=3, window=2)
    assert (plan.resident, plan.window) == (3, 2)


def test_cpu_optimizer_threads_follow_the_share_of_cpu_work():
    """All the cores where the streamed layers' CPU steps bound the iteration; half where a few
    streamed layers' steps hide behind the GPU work and the main thread needs the cores to launch it."""
    c = costs(88, "--recompute-granularity", "full")
    assert make_plan(c, gpu_free=90 * GiB, host_free=120 * GiB, resident=83, cores=15).threads == 8
    assert make_plan(c, gpu_free=80 * GiB, host_free=120 * GiB, resident=0, window=2, cores=15).threads == 15
    assert make_plan(c, gpu_free=90 * GiB, host_free=120 * GiB, resident=83, cores=1).threads == 1


def test_many_small_micro_batches_leave_the_main_thread_half_the_cores():
    """Global batch 64 of micro-batch 4, all 32 layers streamed: the CPU steps are a fifth of the
    compute, and the main thread launching 16 micro-batches' kernels needs the other cores (measured:
    8 threads ran 1.28x faster than 15 on an H200), even though clipping defers every step."""
    c = costs(32, "--micro-batch-size", "4", "--global-batch-size", "64", "--recompute-granularity", "full")
    assert c.microbatches == 16
    assert make_plan(c, gpu_free=140 * GiB, host_free=120 * GiB, resident=0, cores=15).threads == 8


def test_user_threads_override_the_plan():
    from megatron.stronghold import training

    args = arguments.parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--mock-data", "--offload-method", "stronghold",
                                 "--cpu-optimizer-threads", "3"])
    plan, line = training.preflight(args, 128, training.torch.device("cpu"))
    assert plan.threads == 3 and "CPU optimizer threads: 3 |" in line
    # on a CPU: one memory, and no prediction from a GPU's rates
    assert "(no GPU) | predicted iteration: none without a GPU |" in line and "GPU:" not in line
    args = arguments.parse_args(["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                                 "--seq-length", "16", "--mock-data", "--offload-method", "stronghold"])
    plan, line = training.preflight(args, 128, training.torch.device("cpu"))
    from megatron.stronghold.executor.cpu_worker import default_threads
    assert 1 <= plan.threads <= default_threads() and f"CPU optimizer threads: {plan.threads} |" in line


def test_each_data_parallel_rank_holds_its_share_of_the_streamed_layers():
    from megatron.stronghold.planner import host_bytes

    one = costs(200, "--recompute-granularity", "full")
    two = ModelCosts(**{**one.__dict__, "data_parallel": 2})
    per_layer = one.layer_params * one.host_bytes_per_param
    assert host_bytes(one, 20) - host_bytes(two, 20) == 90 * per_layer  # 180 streamed layers: 90 each
    assert host_bytes(two, 19) - host_bytes(two, 20) == per_layer  # 181 streamed: the first rank holds 91


def test_capacity_is_gpu_plus_host():
    """Resident layers fill the GPU; every extra GiB of host memory holds more streamed layers."""
    c = costs(1, "--recompute-granularity", "full")
    per_layer_host = c.layer_params * c.host_bytes_per_param
    for host in (20 * GiB, 120 * GiB):
        layers = layers_that_fit(c, 80 * GiB, host)
        plan = make_plan(ModelCosts(**{**c.__dict__, "layers": layers}), 80 * GiB, host)
        assert plan.resident * c.layer_params * c.resident_bytes_per_param > 60 * GiB  # the GPU is used
        assert host - per_layer_host < plan.host_bytes <= host  # and the host, to within one layer


def test_capacity_per_method_is_the_edge_of_its_preflight_check():
    """The largest-model search starts at these: megatron-lm is bound by the GPU, l2l by the host."""
    c = costs(1, "--recompute-granularity", "full")
    gpu, host = 80 * GiB, 120 * GiB
    at = lambda layers: ModelCosts(**{**c.__dict__, "layers": layers})  # noqa: E731
    megatron = layers_that_fit(c, gpu, host, "megatron-lm")
    megatron_check(at(megatron), gpu, host)
    with pytest.raises(DoesNotFit):
        megatron_check(at(megatron + 1), gpu, host)
    l2l = layers_that_fit(c, gpu, host, "l2l")
    make_plan(at(l2l), gpu, host, resident=0, window=1)
    with pytest.raises(DoesNotFit):
        make_plan(at(l2l + 1), gpu, host, resident=0, window=1)
    assert megatron < l2l < layers_that_fit(c, gpu, host)


def test_zero_baselines_are_bound_by_deepspeeds_host_bytes():
    """DeepSpeed's host peak, counted at 28 B per parameter with ZeRO-Offload at bf16 without accumulation and 31
    with ZeRO-Infinity (measured on an H100 host): with 240 GiB of host both fall between megatron-lm and stronghold
    (with the 120 GiB of the GPU machine's host they hold less than megatron-lm holds on an 80 GB GPU)."""
    c = costs(1, "--recompute-granularity", "full")
    gpu, host = 80 * GiB, 240 * GiB
    at = lambda layers: ModelCosts(**{**c.__dict__, "layers": layers})  # noqa: E731
    offload = layers_that_fit(c, gpu, host, "zero-offload")
    infinity = layers_that_fit(c, gpu, host, "zero-infinity")
    zero_check(at(offload), gpu, host, "zero-offload")
    with pytest.raises(DoesNotFit, match=r"zero-offload needs at least [\d.]+ GiB host \+ [\d.]+ GiB GPU"):
        zero_check(at(offload + 1), gpu, host, "zero-offload")
    assert ((offload + 1) * c.layer_params + c.other_params) * 28 > host  # the host is what ran out
    assert layers_that_fit(c, gpu, host, "megatron-lm") < infinity < offload < layers_that_fit(c, gpu, host)


def test_zero_offload_refuses_the_llama2_7b_shape_that_the_kernel_killed():
    """ZeRO-Offload, Llama-2-7B's shape (6.74 B), 16 micro-batches per step, on an H100 80 GB whose host had
    125 GiB available: admitted at 16 B/param, it was killed for host memory at its first iteration
    (DeepSpeed's accumulated-gradient buffers come then). Now refused before anything is allocated, with the
    bytes per parameter measured on that host (28) and the accumulation buffer (2)."""
    llama2 = arguments.parse_args([
        "--num-layers", "32", "--hidden-size", "4096", "--num-attention-heads", "32", "--ffn-hidden-size", "11008",
        "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--disable-bias-linear",
        "--untie-embeddings-and-output-weights", "--seq-length", "4096", "--micro-batch-size", "1",
        "--global-batch-size", "16", "--recompute-granularity", "full", "--bf16", "--offload-method", "zero-offload"])
    c = ModelCosts.of(llama2, 32000)
    assert 6.7e9 < c.layers * c.layer_params + c.other_params < 6.8e9
    with pytest.raises(DoesNotFit, match=r"zero-offload needs at least 188.\d GiB host .* 30 B per parameter"):
        zero_check(c, int(78.7 * GiB), 125 * GiB, "zero-offload")


def test_the_zero_counts_cover_the_measured_peaks():
    """The committed H100 measurements (results/h100/2026-12-07-zerobytes/zerobytes.txt): each method's counted
    host bytes at 16 and 48 layers (hidden 2048, micro-batch 4, seq 1024, bf16) lie between the measured
    peak and 20% above it (the pre-flight check must not admit what the kernel then kills), and
    ZeRO-Offload's GPU bytes within 10% of its peak."""
    import re

    path = os.path.join(ROOT, "results", "h100", "2026-12-07-zerobytes", "zerobytes.txt")
    found = re.findall(r"^(zero-\w+) L=(\d+) summary .*peak GPU memory \(GiB\): ([\d.]+) \| peak host RSS \(GiB\): "
                       r"([\d.]+)", open(path).read(), re.M)
    assert len(found) == 4
    for method, layers, gpu, host in found:
        args = arguments.parse_args(["--num-layers", layers, "--bf16", "--offload-method", method,
                                     "--micro-batch-size", "4"])
        counted_host, counted_gpu = zero_bytes(ModelCosts.of(args, 384), method)  # the byte tokenizer's vocabulary
        assert float(host) <= counted_host / GiB <= 1.2 * float(host), (method, layers, counted_host / GiB, host)
        if method == "zero-offload":  # ZeRO-3 frees and gathers parameters as it goes: its GPU peak is not a count
            assert counted_gpu / GiB == pytest.approx(float(gpu), rel=0.1), (method, layers)


def test_a_model_that_cannot_fit_is_refused_with_the_numbers():
    with pytest.raises(DoesNotFit, match=r"needs [\d.]+ GiB host \+ [\d.]+ GiB GPU.*has [\d.]+ GiB host and [\d.]+ GiB GPU"):
        make_plan(costs(2000), gpu_free=80 * GiB, host_free=120 * GiB)


@pytest.mark.parametrize("method", ["stronghold", "zero-offload"])
def test_refused_before_allocating_within_seconds(method):
    start = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), "--num-layers", "100000",
                           "--hidden-size", "8192", "--num-attention-heads", "64", "--offload-method",
                           method, "--mock-data"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert "does not fit" in proc.stderr and "GiB" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert time.time() - start < 60


def test_resident_layers_cost_no_host_memory_since_each_leaves_the_host_as_it_is_built():
    from megatron.stronghold.planner import host_bytes

    small, large = costs(10), costs(200)
    assert host_bytes(small, 10) == host_bytes(large, 200)  # all resident: the embeddings and one layer
    # data parallel: the fp32 weights a rank keeps after the build are its own streamed layers only
    two = ModelCosts(**{**large.__dict__, "data_parallel": 2})
    assert host_bytes(two, 0) < host_bytes(large, 0)


def test_tensor_parallel_ranks_share_the_output_layer(monkeypatch):
    # Each of tp ranks multiplies the whole hidden state by its 1/tp of the output columns.
    import dataclasses

    from megatron.stronghold.planner.costs import compute_seconds

    def output_layer_seconds(c):
        return compute_seconds(dataclasses.replace(c, layers=0), resident=0)

    one = costs(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    two = costs(1, "--tensor-model-parallel-size", "2")
    assert output_layer_seconds(one) > 0
    assert output_layer_seconds(two) == pytest.approx(output_layer_seconds(one) / 2)


def test_a_cpu_run_reserves_what_a_cpu_process_holds():
    """Without a GPU there are no CUDA libraries or workspaces to reserve for: a tiny model fits in the
    2 GiB a rank of `-n 3` gets on a small machine (the GPU reserves alone would be 8.5 GiB)."""
    tiny = ModelCosts.of(arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads",
                                               "4", "--seq-length", "32", "--micro-batch-size", "2"]), 384)
    plan = make_plan(tiny, gpu_free=None, host_free=2 * GiB)
    assert plan.resident == 2
    with pytest.raises(DoesNotFit, match="needs 1.0 GiB of host memory"):
        make_plan(tiny, gpu_free=None, host_free=GiB // 2)


QWEN_14B = ["--hidden-size", "5120", "--num-attention-heads", "40", "--group-query-attention", "--num-query-groups",
            "8", "--ffn-hidden-size", "13824", "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type",
            "rope", "--disable-bias-linear", "--add-qkv-bias", "--untie-embeddings-and-output-weights", "--seq-length",
            "4096", "--micro-batch-size", "1", "--global-batch-size", "16", "--recompute-granularity", "full",
            "--bf16", "--tokenizer-type", "NullTokenizer", "--vocab-size", "152063", *BF16_MOMENTS]


@pytest.mark.parametrize("layers, peak", [(14, 64.706), (16, 70.945)])
def test_gpu_count_meets_a_measured_peak_with_a_large_vocabulary(layers, peak):
    """megatron-lm, Qwen2.5-14B's shape at 14 and 16 layers (vocabulary 152064, sequence 4096, bf16 moments),
    on an H100: peaks of 64.71 and 70.95 GiB allocated (results/h100/2026-12-07-qwen14b/). The count without
    its reserve must not fall below a peak, and stays within 8% above it: the logits' allocator room
    (costs.ModelCosts.act_fixed) is 4.4 GiB of it here."""
    from megatron.stronghold.planner.costs import GPU_RESERVE, gpu_bytes

    c = ModelCosts.of(arguments.parse_args(["--num-layers", str(layers), *QWEN_14B]), 152064)
    counted = (gpu_bytes(c, layers, 0) - GPU_RESERVE) / GiB
    assert peak <= counted <= 1.08 * peak


def test_qwen14b_plan_on_an_h100_keeps_the_placement_that_trained():
    """Qwen2.5-14B's 48 layers on an H100 (78.7 GiB free, about 120 GiB host), W=2: 5 resident layers
    trained (peak 65.2 GiB allocated); a tighter count planned 7 and ran out of memory with 9.1 GiB reserved
    but unallocated (results/h100/2026-12-07-qwen14b/)."""
    c = ModelCosts.of(arguments.parse_args(["--num-layers", "48", *QWEN_14B]), 152064)
    plan = make_plan(c, gpu_free=int(78.7 * GiB), host_free=120 * GiB, window=2)
    assert 0 < plan.resident <= 5


class ScriptedProbe:
    """A machine whose measurements are scripted and counted (planner/machine.py's GpuProbe interface)."""

    def __init__(self, card="card A"):
        self.card, self.calls = card, []

    def copies(self):
        self.calls.append("copies")
        return [50e9, 40e9]

    def cpu_adam(self, threads):
        self.calls.append(f"adam {threads}")
        return threads * 0.25e9

    def layer(self):
        self.calls.append("layer")
        return [1e-3, 2.5e-3, 4e-3, 20e9, 50e9]


def test_machine_rates_are_measured_once_per_machine_and_card(tmp_path, monkeypatch):
    from megatron.stronghold.planner.machine import measured_rates

    monkeypatch.setenv("STRONGHOLD_CACHE_DIR", str(tmp_path))
    args = arguments.parse_args(["--num-layers", "4", "--bf16"])
    first = ScriptedProbe()
    rates = measured_rates(first, args, 50304, (16, 8))
    assert sorted(first.calls) == ["adam 16", "adam 8", "copies", "layer"]
    assert (rates.h2d, rates.layer_backward, rates.adam_rate(8), rates.adam_rate(None), rates.resident_step,
            rates.embedding_step) == (50e9, 2.5e-3, 2e9, 4e9, 20e9, 50e9)
    again = ScriptedProbe()
    assert measured_rates(again, args, 50304, (16, 8)) == rates and again.calls == []  # the cache
    refreshed = ScriptedProbe()
    measured_rates(refreshed, args, 50304, (16, 8), refresh=True)
    assert len(refreshed.calls) == 4
    other_card = ScriptedProbe("card B")  # the CPU rates are the host's: measured once for both cards
    measured_rates(other_card, args, 50304, (16, 8))
    assert sorted(other_card.calls) == ["copies", "layer"]
    longer = ScriptedProbe()  # another shape: its layer again, nothing else
    measured_rates(longer, arguments.parse_args(["--num-layers", "4", "--bf16", "--seq-length", "2048"]), 50304, (16, 8))
    assert longer.calls == ["layer"]
    untied = ScriptedProbe()  # an untied output layer: the head's time differs, so the layer is measured again
    measured_rates(untied, arguments.parse_args(["--num-layers", "4", "--bf16", "--untie-embeddings-and-output-weights"]),
                   50304, (16, 8))
    assert untied.calls == ["layer"]
    (tmp_path / "machine-rates.json").write_text("{not json")  # a damaged cache is measured again
    damaged = ScriptedProbe()
    measured_rates(damaged, args, 50304, (16, 8))
    assert len(damaged.calls) == 4


def test_the_prediction_is_made_of_the_measured_rates():
    """All resident, full recompute, 4 micro-batches: 4 x (layers x (2 forward + backward) + head) and the GPU
    optimizer's step over the resident parameters; streamed layers add their loads over the measured link and
    their CPU steps at the measured rate."""
    import dataclasses

    from megatron.stronghold.planner.machine import Rates
    from megatron.stronghold.planner.plan import predicted_seconds

    rates = Rates("measured on card A", 50e9, 40e9, ((8, 2e9), (16, 4e9)), 1e-3, 2.5e-3, 4e-3, 20e9, 50e9)
    c = dataclasses.replace(costs(12, "--global-batch-size", "16", "--recompute-granularity", "full"), rates=rates)
    assert c.microbatches == 4
    assert predicted_seconds(c, 12, 0) == pytest.approx(4 * (12 * (2e-3 + 2.5e-3) + 4e-3)
                                                        + c.other_params / 50e9 + 12 * c.layer_params / 20e9)
    streamed = predicted_seconds(c, 8, 2, threads=8)
    compute = 4 * (12 * 4.5e-3 + 4e-3) + c.other_params / 50e9 + 8 * c.layer_params / 20e9
    one_layer = c.layer_params * (1 / 2e9 + 2 / 50e9)
    cpu = 4 * c.layer_params / 2e9
    assert streamed == pytest.approx(max(compute + max(0.0, cpu - 4 * 4 * 1e-3), 6 * c.layer_params * 2 / 50e9)
                                     + one_layer)
    plan = make_plan(c, 80 * GiB, 100 * GiB, threads=8)
    assert "rates (measured on card A): host->GPU 50 GB/s, GPU->host 40 GB/s, CPU AdamW 2.00 G params/s" in plan.describe(c)


def test_the_probe_times_the_real_layer_and_kernel(monkeypatch):
    """GpuProbe's layer and CPU AdamW timings run the trainer's own layer and the host store's kernel (here
    on the CPU, where the copies have no GPU to go to), in the run's dtype and layer kind. Every weight
    gradient it times is summed into a main grad, as the run sums it: the layer's, the output layer's and
    the word embedding's (one table when tied, two when not)."""
    import collections

    import torch

    from megatron.stronghold import distributed
    from megatron.stronghold.optim import ResidentOptimizer
    from megatron.stronghold.planner.machine import REPEATS, GpuProbe

    summed = collections.Counter()  # shape of a main grad -> gradients summed into one of that shape
    original = ResidentOptimizer.accumulator

    def counting(main_grad):
        hook = original(main_grad)

        def accumulate(param):
            summed[tuple(main_grad.shape)] += 1
            hook(param)
        return accumulate

    monkeypatch.setattr(ResidentOptimizer, "accumulator", staticmethod(counting))
    distributed.init_distributed(torch.device("cpu"))
    for flags, tables in ((["--bf16"], 1), (["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type",
                                             "rope", "--group-query-attention", "--num-query-groups", "2",
                                             "--untie-embeddings-and-output-weights"], 2)):
        args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                     "--seq-length", "32", "--micro-batch-size", "2", *flags])
        summed.clear()
        probe = GpuProbe(args, torch.device("cpu"), 512)
        forward, backward, head, step, embedding_step = probe.layer()
        assert forward > 0 and backward > 0 and head > 0 and step > 0 and embedding_step > 0
        assert probe.cpu_adam(1) > 0
        timed = 2 + REPEATS  # warm-up and timed backward passes
        assert summed[(64, 64)] >= timed  # the layer's projection weights, in every timed backward
        assert summed[(512, 64)] == tables * (2 + REPEATS)  # the head's warm-up and timed passes


def test_the_plan_recomputes_only_the_resident_layers_the_gpu_needs():
    """--recompute-granularity full without --recompute-method: the plan keeps the activations of as many
    resident layers as fit and recomputes the rest, the fewest that fit; its prediction and bytes count
    them. An explicit --recompute-method stands (all resident layers recompute)."""
    from megatron.stronghold.planner.costs import gpu_bytes
    from megatron.stronghold.planner.plan import predicted_seconds

    c = costs(32, "--recompute-granularity", "full", "--global-batch-size", "16")
    everything = gpu_bytes(c, 32, 0, resident_recompute=32)
    none = gpu_bytes(c, 32, 0, resident_recompute=0)
    budget = (everything + none) // 2  # room for about half the layers' activations
    plan = make_plan(c, budget, 200 * GiB)
    assert plan.resident == 32 and 0 < plan.resident_recompute < 32
    assert gpu_bytes(c, 32, 0, resident_recompute=plan.resident_recompute) <= budget
    assert gpu_bytes(c, 32, 0, resident_recompute=plan.resident_recompute - 1) > budget
    assert predicted_seconds(c, 32, 0, resident_recompute=plan.resident_recompute) < predicted_seconds(c, 32, 0)
    assert f"resident layers recompute: {plan.resident_recompute} |" in plan.describe(c)
    assert make_plan(c, 200 * GiB, 200 * GiB).resident_recompute == 0
    explicit = costs(32, "--recompute-granularity", "full", "--global-batch-size", "16", "--recompute-method", "uniform")
    assert make_plan(explicit, budget, 200 * GiB).resident_recompute is None


def test_a_plans_partial_recompute_trains_like_megatron(tmp_path):
    """Two resident layers of four, neither recomputing (the plan's choice on a CPU, where memory is ample),
    train exactly as megatron-lm with every layer recomputed: recompute is exact."""
    import torch

    from megatron.stronghold import training

    def run(*extra):
        argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--mock-data",
                "--recompute-granularity", "full", "--seed", "3", *extra]
        return training.train(arguments.parse_args(argv)).losses

    reference = run()
    assert run("--offload-method", "stronghold", "--resident-layers", "2") == pytest.approx(reference, rel=1e-6)
    assert all(torch.isfinite(torch.tensor(reference)))


def test_block_recompute_is_counted_and_recomputes_the_first_resident_layers(monkeypatch):
    """--recompute-method block --recompute-num-layers N (Megatron-LM's flags): the plan and megatron-lm's check
    count N layers recomputing and the rest keeping their activations (they counted every layer recomputing,
    so a plan could overflow the GPU); stronghold recomputes the first N of its resident layers (the streamed
    ones come first and follow the plan) and still trains like megatron-lm."""
    from megatron.stronghold import model as model_lib, training
    from megatron.stronghold.planner.costs import gpu_bytes, zero_bytes
    from megatron.stronghold.planner.preflight import megatron_check

    block = costs(32, "--recompute-granularity", "full", "--global-batch-size", "16", "--recompute-method", "block",
                  "--recompute-num-layers", "3")
    plan = make_plan(block, 200 * GiB, 200 * GiB)
    assert (plan.resident, plan.resident_recompute) == (32, 3)
    assert plan.gpu_bytes == gpu_bytes(block, 32, 0, resident_recompute=3) > gpu_bytes(block, 32, 0, resident_recompute=32)
    assert gpu_bytes(block, 32, 0) == plan.gpu_bytes  # megatron-lm's count: the same 3 layers
    with pytest.raises(DoesNotFit):
        megatron_check(block, gpu_bytes(block, 32, 0, resident_recompute=32), 200 * GiB)
    uniform = costs(32, "--recompute-granularity", "full", "--global-batch-size", "16", "--recompute-method", "uniform")
    for method in ("zero-offload", "zero-infinity"):  # DeepSpeed's model recomputes the same first 3 layers
        assert (zero_bytes(block, method)[1] - zero_bytes(uniform, method)[1]
                == 29 * (block.layer_activations - block.hidden_state))

    recomputed = []
    enable = model_lib.enable_recompute
    monkeypatch.setattr(model_lib, "enable_recompute", lambda layer: (recomputed.append(layer.layer_number - 1),
                                                                      enable(layer)))

    def run(*extra):
        recomputed.clear()
        argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3", "--mock-data",
                "--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "1",
                "--seed", "3", *extra]
        return training.train(arguments.parse_args(argv)).losses, list(recomputed)

    reference, megatron_recomputed = run()
    assert megatron_recomputed == [0]
    losses, stronghold_recomputed = run("--offload-method", "stronghold", "--resident-layers", "2")
    assert stronghold_recomputed == [2]  # layers 0 and 1 stream; 2 is the first resident one
    assert losses == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize("flags", [(), ("--recompute-granularity", "full"), ("--global-batch-size", "32"),
                                   ("--recompute-granularity", "full", "--global-batch-size", "32")])
def test_the_plan_is_the_fastest_placement_that_fits(flags):
    """On a GPU budget the plan has the shortest predicted iteration of every placement that fits (resident
    layers, what the streamed ones keep, how many resident ones recompute), found here by trying each."""
    import dataclasses

    from megatron.stronghold.planner.costs import gpu_bytes, host_bytes
    from megatron.stronghold.planner.machine import Rates
    from megatron.stronghold.planner.plan import predicted_seconds

    rates = Rates("measured on card A", 50e9, 40e9, ((8, 2e9),), 4e-3, 9e-3, 20e-3, 20e9, 50e9)
    c = dataclasses.replace(costs(96, *flags), rates=rates)
    gpu, host = 60 * GiB, 200 * GiB
    plan = make_plan(c, gpu, host, threads=8)
    times = []
    for r in range(c.layers + 1):
        for recompute in ((True,) if c.recompute else (False, True)):
            for n in (range(r + 1) if c.recompute_chosen else (None,)):
                if gpu_bytes(c, r, min(4, c.layers - r), recompute, False, n) <= gpu and host_bytes(c, r) <= host:
                    times.append(predicted_seconds(c, r, min(4, c.layers - r), recompute, threads=8,
                                                   resident_recompute=n))
    assert plan.predicted_s == pytest.approx(min(times))


def test_megatron_offload_takes_the_smallest_fraction_that_fits():
    """megatron-core's optimizer offload keeps every weight and fp32 gradient on the GPU; its pre-flight check
    moves the fewest optimizer states to the CPU that let the rest fit, and refuses what does not fit at 1."""
    from megatron.stronghold.planner.costs import offload_bytes
    from megatron.stronghold.planner.preflight import check

    c = costs(64, "--recompute-granularity", "full")
    host = 200 * GiB
    everything_on_gpu = offload_bytes(c, 0.0)[1]
    assert check(c, everything_on_gpu, host, "megatron-offload").fraction == 0.0
    half = (offload_bytes(c, 0.0)[1] + offload_bytes(c, 1.0)[1]) // 2
    plan = check(c, half, host, "megatron-offload")
    assert 0.49 <= plan.fraction <= 0.51 and plan.gpu_bytes <= half
    assert offload_bytes(c, plan.fraction - 0.01)[1] > half
    assert "optimizer offload fraction: 0.5" in plan.describe(c)
    assert check(c, half, host, "megatron-offload", fraction=0.8).fraction == 0.8  # the user's stands
    with pytest.raises(DoesNotFit, match=r"megatron-offload with --optimizer-offload-fraction 1 needs"):
        check(c, offload_bytes(c, 1.0)[1] - GiB, host, "megatron-offload")
    assert layers_that_fit(c, 80 * GiB, host, "megatron-lm") < layers_that_fit(c, 80 * GiB, host, "megatron-offload")


def test_the_trainer_reads_an_offload_plan_as_a_plan():
    """The config line and the recompute choice read window, resident and resident_recompute of any plan (a GPU
    run of megatron-offload stopped on the missing window)."""
    from megatron.stronghold.planner.preflight import check

    plan = check(costs(8), 80 * GiB, 200 * GiB, "megatron-offload")
    assert (plan.window, plan.resident, plan.resident_recompute) == (None, None, None)


def test_resident_layers_that_keep_their_activations_are_counted_as_measured():
    """The plan that keeps every resident layer's activations (none recomputing), measured on an H100: Llama-3-8B's
    layer x 8 at micro-batch 2 x 2048 tokens, 16 micro-batches, bf16 moments (results/h100/2026-12-07-sft/sft.txt,
    the packed run). Its count without the reserve lies between the measured peak and 10% above it."""
    import re

    text = open(os.path.join(ROOT, "results", "h100", "2026-12-07-sft", "sft.txt")).read()
    assert "packed plan | resident layers: 8 | streamed layers: 0 |" in text
    assert "resident layers recompute: 0 |" in text
    peak = float(re.search(r"^packed summary .*peak GPU memory \(GiB\): ([\d.]+)", text, re.M).group(1))
    from megatron.stronghold.planner.costs import GPU_RESERVE, gpu_bytes

    llama = ("--num-layers 8 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32 --group-query-attention "
             "--num-query-groups 8 --seq-length 2048 --max-position-embeddings 8192 --normalization RMSNorm --swiglu "
             "--disable-bias-linear --untie-embeddings-and-output-weights --position-embedding-type rope "
             "--micro-batch-size 2 --global-batch-size 32 --bf16 --recompute-granularity full").split()
    c = ModelCosts.of(arguments.parse_args([*llama, *BF16_MOMENTS]), 128256)
    counted = (gpu_bytes(c, 8, 0, resident_recompute=0) - GPU_RESERVE) / GiB
    assert peak <= counted <= 1.1 * peak, (counted, peak)


def test_a_gpu_too_full_to_measure_keeps_the_constants(tmp_path, monkeypatch):
    """Out of GPU memory while measuring (a card shared with another job): the plan uses the constants, the
    log says so, and nothing half-measured is cached."""
    import torch

    from megatron.stronghold.planner.machine import ASSUMED, rates_or_constants

    class FullCard(ScriptedProbe):
        device = torch.device("cpu")

        def layer(self):
            raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setenv("STRONGHOLD_CACHE_DIR", str(tmp_path))
    said = []
    args = arguments.parse_args(["--num-layers", "4", "--bf16"])
    assert rates_or_constants(FullCard(), args, 50304, (16, 8), log=said.append) is ASSUMED
    assert said[-1] == "> measuring this machine ran out of GPU memory: the plan uses costs.py's constants"
    assert not (tmp_path / "machine-rates.json").exists()
