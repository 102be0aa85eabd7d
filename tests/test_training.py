"""The training entry on tiny CPU models: determinism, learning, accumulation, data, logs, memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.stronghold import arguments, distributed, methods, training
from megatron.stronghold.logs import parse_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--lr", "3e-3", "--log-interval", "5"]


def train(*flags):
    return training.train(arguments.parse_args([*TINY, *flags]))


@pytest.mark.integration
def test_same_seed_same_losses_other_seed_other_losses():
    a = train("--train-iters", "5", "--seed", "5")
    b = train("--train-iters", "5", "--seed", "5")
    c = train("--train-iters", "5", "--seed", "6")
    assert a.losses == b.losses and a.grad_norms == b.grad_norms
    assert a.losses != c.losses


@pytest.mark.integration
def test_loss_falls_on_mock_data():
    h = train("--train-iters", "30", "--mock-data")
    assert sum(h.losses[-5:]) / 5 < h.losses[0] - 0.5


@pytest.mark.integration
def test_gradient_accumulation_equals_a_larger_batch():
    """Three micro-batches of 2 and one micro-batch of 6 see the same samples and the same gradient
    (dropout off: the two runs would draw different masks)."""
    no_dropout = ("--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "6")
    accumulated = train("--global-batch-size", "6", *no_dropout)
    one_batch = train("--micro-batch-size", "6", "--global-batch-size", "6", *no_dropout)
    assert accumulated.losses == pytest.approx(one_batch.losses, rel=1e-5)
    assert accumulated.grad_norms == pytest.approx(one_batch.grad_norms, rel=1e-5)


@pytest.fixture(scope="module")
def real_text(tmp_path_factory):
    """Python's own standard library, preprocessed to Megatron's .bin/.idx with the byte tokenizer."""
    tmp = tmp_path_factory.mktemp("text")
    sources = sorted(os.path.join(os.path.dirname(os.__file__), f) for f in os.listdir(os.path.dirname(os.__file__))
                     if f.endswith(".py"))[:40]
    with open(tmp / "corpus.jsonl", "w") as f:
        for path in sources:
            with open(path, encoding="utf-8", errors="replace") as src:
                f.write(json.dumps({"text": src.read()}) + "\n")
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                    str(tmp / "corpus.jsonl"), "--output-prefix", str(tmp / "corpus"), "--tokenizer-type",
                    "ByteLevelTokenizer", "--append-eod"], check=True, capture_output=True)
    return str(tmp / "corpus_text_document")


@pytest.mark.integration
def test_loss_falls_on_real_text_and_validation_runs(real_text, capsys):
    h = train("--train-iters", "40", "--data-path", real_text, "--tokenizer-type", "ByteLevelTokenizer",
              "--split", "90,10,0", "--eval-interval", "20", "--eval-iters", "2")
    assert sum(h.losses[-5:]) / 5 < h.losses[0] - 1.0  # bytes of Python source are very learnable
    assert [it for it, _ in h.valid_losses] == [20, 40]
    assert h.valid_losses[1][1] < h.losses[0]
    assert "validation loss at iteration 40 | lm loss value:" in capsys.readouterr().out


BF16_MOMENTS = ("--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16")


@pytest.mark.unit
@pytest.mark.parametrize("flags,expected", [
    (("--bf16",), 14), (("--bf16", "--global-batch-size", "4"), 14),  # the sum stays on the device
    (("--bf16", "--no-store-param-remainders"), 16), (("--bf16", *BF16_MOMENTS), 10),
    (("--bf16", *BF16_MOMENTS, "--main-grads-dtype", "bf16"), 10),
    ((), 16), (BF16_MOMENTS, 12), (("--fp16",), 18), (("--fp16", *BF16_MOMENTS), 14),
])
def test_host_store_bytes_per_parameter_are_the_planners(flags, expected):
    from megatron.stronghold.executor import StreamingExecutor
    from megatron.stronghold.model import build_model
    from megatron.stronghold.planner.costs import ModelCosts

    args = arguments.parse_args([*TINY, "--offload-method", "stronghold", *flags])
    assert ModelCosts.of(args, 128).host_bytes_per_param == expected
    distributed.init_distributed(torch.device("cpu"))
    layers = list(build_model(args, 128).decoder.layers)
    executor = StreamingExecutor(layers, 1, args.params_dtype, torch.device("cpu"), args)
    host = executor.host_bytes()
    streamed = len(layers) * executor.layout.numel
    total = host["pinned"] + host["pageable"]
    # per parameter exactly `expected` (remainders: plus 8 B per tie, none before the first step)
    assert total == expected * streamed
    executor.shutdown()


@pytest.mark.unit
@pytest.mark.parametrize("flags,expected", [
    (("--bf16",), 16), (("--bf16", "--no-store-param-remainders"), 18), (("--bf16", *BF16_MOMENTS), 12),
    (BF16_MOMENTS, 12), (("--bf16", *BF16_MOMENTS, "--main-grads-dtype", "bf16"), 10), ((), 16),
    (("--fp16",), 18), (("--fp16", *BF16_MOMENTS), 14)])
def test_resident_optimizer_bytes_per_parameter_are_the_planners(flags, expected):
    """What the planner counts per resident parameter is what the megatron-lm step holds after its first
    step: weights, master, main grad and moments (fp32 moments are allocated by torch at that step)."""
    from megatron.stronghold.planner.costs import ModelCosts

    args = arguments.parse_args([*TINY, "--train-iters", "1", *flags])
    assert ModelCosts.of(args, 128).resident_bytes_per_param == expected
    distributed.init_distributed(torch.device("cpu"))
    method = methods.build(args, None, build_model_for(args), torch.device("cpu"), args.params_dtype, None, print)
    opt = method.resident
    opt.step(1.0, skip=False)  # lazily made fp32 moments now exist (the main grads are zero)
    tensors = {t.untyped_storage().data_ptr(): t for t in [*opt.params, *opt.masters, *opt.main_grads,
                                                          *getattr(opt, "remainder", [])]
               + [v for st in opt.optimizer.state.values() for k, v in st.items() if k != "step"]}
    held = sum(t.untyped_storage().nbytes() for t in tensors.values())  # fp32: the master is the weight
    assert held == expected * sum(p.numel() for p in opt.params)
    assert all(g.dtype == args.main_grads_torch_dtype for g in opt.main_grads)


def build_model_for(args):
    from megatron.stronghold.model import build_model
    return build_model(args, 128)


@pytest.mark.unit
def test_nan_iterations_are_counted_over_the_log_interval(capsys):
    """An absurd learning rate: iteration 1 is finite, the next four are not (their steps are skipped, and
    --exit-on-nonfinite-iters 0 keeps going): Megatron-LM's count over the interval is 4, not 1."""
    status = training.main([*TINY, "--train-iters", "5", "--log-interval", "5", "--lr", "1e30",
                            "--lr-warmup-iters", "0", "--lr-decay-style", "constant", "--exit-on-nonfinite-iters", "0",
                            "--offload-method", "stronghold", "--window-size", "1"])
    assert status == 0
    (row,) = parse_log(capsys.readouterr().out).iterations
    assert row["number of nan iterations"] == 4 and row["number of skipped iterations"] == 4


@pytest.mark.integration
def test_log_lines_parse_back():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *TINY, "--train-iters", "4",
                           "--log-interval", "2", "--offload-method", "stronghold", "--window-size", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = parse_log(proc.stdout)
    assert [row["iteration"] for row in log.iterations] == [2, 4]
    for row in log.iterations:
        for key in ("consumed samples", "elapsed time per iteration (ms)", "learning rate", "global batch size",
                    "lm loss", "loss scale", "grad norm", "number of skipped iterations", "samples per second",
                    "TFLOP/s per GPU"):
            assert key in row, key
    assert log.iterations[1]["consumed samples"] == 8
    assert log.total_parameters > 0
    assert log.config["method"] == "stronghold" and log.config["precision"] == "fp32"
    assert log.summary["iterations"] == 4 and log.summary["samples per second"] > 0
    assert "peak host RSS (GiB)" in log.summary and "pinned host memory (GiB)" in log.summary
    assert log.summary["host-to-device (MiB/iter)"] > 0 and log.summary["device-to-host (MiB/iter)"] > 0
    assert "start-up: " in proc.stdout and "model built and initialised in" in proc.stdout


@pytest.mark.unit
def test_several_processes_are_refused_where_parallelism_is_missing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(arguments.ArgumentError, match="not yet for zero-offload"):
        arguments.parse_args([*TINY, "--offload-method", "zero-offload"])


@pytest.mark.unit
def test_megatron_offload_is_refused_without_a_gpu_and_outside_bf16(monkeypatch, capsys):
    """megatron-core's optimizer offload allocates its buffers and streams on CUDA: without a GPU one line and
    exit 2, before anything is built; with a GPU it takes --bf16 only."""
    assert training.main([*TINY, "--offload-method", "megatron-offload", "--mock-data"]) == 2
    err = capsys.readouterr().err
    assert "--offload-method megatron-offload needs a CUDA GPU" in err and "Traceback" not in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(arguments.ArgumentError, match="trains in bf16 only .this run: fp32.; add --bf16"):
        arguments.parse_args([*TINY, "--offload-method", "megatron-offload"])
    with pytest.raises(arguments.ArgumentError, match="--optimizer-offload-fraction must be between 0 and 1"):
        arguments.parse_args([*TINY, "--offload-method", "megatron-offload", "--bf16", "--optimizer-offload-fraction",
                              "1.5"])


@pytest.mark.integration
def test_manual_gc_collects_between_steps_only(monkeypatch):
    """--manual-gc: the threshold-based collector is off during training (no pause inside an iteration)
    and collections happen at the start and every --manual-gc-interval iterations, as in Megatron-LM."""
    import gc

    collected, enabled = [], []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: collected.append(len(enabled)) or real_collect(*a))
    def observe(event, **_):
        if event == "iteration":
            enabled.append(gc.isenabled())

    h = training.train(arguments.parse_args([*TINY, "--train-iters", "5", "--mock-data", "--manual-gc",
                                             "--manual-gc-interval", "2"]), observer=observe)
    assert len(h.losses) == 5
    assert enabled == [False] * 5
    assert collected == [0, 2, 4]  # before iteration 1, after iterations 2 and 4
    assert gc.isenabled()
    enabled.clear()
    training.train(arguments.parse_args([*TINY, "--train-iters", "2", "--mock-data"]), observer=observe)
    assert enabled == [True, True]


@pytest.mark.unit
def test_manual_gc_interval_must_not_be_negative():
    with pytest.raises(arguments.ArgumentError, match="manual-gc-interval"):
        arguments.parse_args([*TINY, "--manual-gc-interval", "-1"])


@pytest.mark.unit
def test_layers_are_placed_as_each_is_built_with_the_same_weights(monkeypatch):
    """Each layer leaves the host build the moment it is initialised (resident ones to the compute
    dtype/device, another data-parallel rank's streamed ones dropped), so the whole model is never in
    fp32 on the host; the weights are those of the unplaced build."""
    from megatron.core import parallel_state
    from megatron.stronghold.model import build_model

    args = arguments.parse_args([*TINY, "--num-layers", "5", "--bf16", "--offload-method", "stronghold",
                                 "--resident-layers", "2"])
    distributed.init_distributed(torch.device("cpu"))
    torch.manual_seed(3)
    reference = {k: v.clone() for k, v in build_model(args, 128).state_dict().items() if torch.is_tensor(v)}

    # Rank 1 of 2: of the streamed layers 2, 3, 4 (streamed 0, 1, 2) it owns only layer 3. (One
    # micro-batch per step: the resident layers come first, see methods/streaming.py.)
    monkeypatch.setattr(parallel_state, "get_data_parallel_world_size", lambda *a, **k: 2)
    monkeypatch.setattr(parallel_state, "get_data_parallel_rank", lambda *a, **k: 1)
    plan, _ = training.preflight(args, 128, torch.device("cpu"))
    place = methods.placement(args, plan, torch.device("cpu"), torch.bfloat16)
    seen = []

    def record(index, layer):
        seen.append(index)
        place(index, layer)

    torch.manual_seed(3)
    model = build_model(args, 128, record)
    assert seen == [0, 1, 2, 3, 4]  # one at a time, in order
    layers = list(model.decoder.layers)
    for index, layer in enumerate(layers):
        weights = list(layer.parameters())
        if index < 2:
            assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in weights)
        elif index == 3:
            assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in weights)
        else:  # their shapes stay for the executor's layout, their weights are gone
            assert all(p.untyped_storage().nbytes() == 4 for p in weights)
    dropped = {f"decoder.layers.{i}." for i in (2, 4)}
    for name, value in model.state_dict().items():
        if torch.is_tensor(value) and not any(name.startswith(d) for d in dropped):
            assert torch.equal(value, reference[name].to(value.dtype)), name


@pytest.mark.integration
def test_each_streamed_layer_crosses_the_link_once_per_step_whatever_the_micro_batches():
    """Layer-major: 2 S - W loads and S gradients per step, for one micro-batch or four."""
    layers, window, iters = 3, 1, 3
    link = []
    for global_batch in ("2", "8"):
        h = train("--num-layers", str(layers), "--train-iters", str(iters), "--mock-data", "--offload-method",
                  "stronghold", "--window-size", str(window), "--global-batch-size", global_batch)
        link.append(h.stats["link"])
    assert link[0] == link[1]
    from megatron.stronghold.model import build_model
    args = arguments.parse_args([*TINY, "--num-layers", str(layers)])
    layer_bytes = 4 * sum(p.numel() for p in build_model(args, 128).decoder.layers[0].parameters())
    assert link[0]["host-to-device"] == iters * (2 * layers - window) * layer_bytes
    assert link[0]["device-to-host"] == iters * layers * layer_bytes


@pytest.mark.integration
def test_start_up_reports_its_progress(monkeypatch, capsys):
    """A large model takes minutes to build and to fill its host store: a progress line every few
    seconds says how far it is (here every step, with the interval at 0)."""
    from megatron.stronghold.logs import Progress

    monkeypatch.setattr(Progress, "interval", 0.0)
    train("--num-layers", "3", "--train-iters", "1", "--mock-data", "--offload-method", "stronghold")
    out = capsys.readouterr().out
    assert "building the model: 3 of 3 layers" in out
    assert "filling the host store: 3 of 3 layers" in out


@pytest.mark.unit
def test_resident_masters_kept_as_remainders_come_back_bit_for_bit():
    """bf16 resident parameters keep their fp32 masters as the weights plus a remainder: masters on exact
    ties of both kinds (the low half 0x8000 under an even or an odd high half) survive a load, a step
    that changes nothing (lr 0) and a state_dict, bit for bit, across a chunk boundary."""
    from megatron.stronghold.checkpointing.format import entry_master
    from megatron.stronghold.optim import ResidentOptimizer

    args = arguments.parse_args(["--bf16", "--lr", "0", "--weight-decay", "0"])
    distributed.init_distributed(torch.device("cpu"))
    params = [torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16)) for n in (1000, 3000)]
    opt = ResidentOptimizer([("a.weight", params[0]), ("b.weight", params[1])], args)
    opt.CHUNK = 1500  # two chunks
    gen = torch.Generator().manual_seed(0)
    masters = {name: torch.randn(p.numel(), generator=gen) for name, p in zip(("a.weight", "b.weight"), params)}
    for m in masters.values():
        bits = m.view(torch.int32)
        bits[::7] = (bits[::7] & ~0xFFFF) | 0x8000  # ties, both parities of the high half
    opt.load_state_dict({name: {"param": m} for name, m in masters.items()})
    assert sum(t.numel() for t in opt.ties) > 100  # the ties that rounded up are listed
    for group in opt.param_groups:
        group.update(lr=0.0, weight_decay=0.0)
    opt.step(1.0, skip=False)
    for name, entry in opt.state_dict().items():
        assert entry["param"].dtype == torch.bfloat16
        assert torch.equal(entry_master(entry).view(torch.int32), masters[name].view(torch.int32)), name
        assert torch.equal(entry["param"], masters[name].to(torch.bfloat16))


@pytest.mark.unit
@pytest.mark.parametrize("moments", [(), BF16_MOMENTS])
def test_resident_step_in_slices_equals_the_whole_masters_step(moments):
    """The resident step with remainders, in slices that cut a parameter in three and span two chunks,
    moves weights, masters and moments exactly as optimizer.step() on whole fp32 masters."""
    from megatron.stronghold.checkpointing.format import entry_master
    from megatron.stronghold.optim import ResidentOptimizer

    distributed.init_distributed(torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    start = {"a.weight": torch.randn(1000, generator=gen), "b.weight": torch.randn(3000, generator=gen),
             "b.bias": torch.randn(40, generator=gen)}
    runs = {}
    for name, flags in (("slices", ()), ("whole", ("--no-store-param-remainders",))):
        args = arguments.parse_args(["--bf16", "--lr", "1e-3", "--weight-decay", "0.1", *moments, *flags])
        params = {k: torch.nn.Parameter(v.to(torch.bfloat16)) for k, v in start.items()}
        opt = ResidentOptimizer(list(params.items()), args)
        opt.CHUNK = 1024  # a multiple of 16, as the real one: torch's CPU kernel rounds a tensor's tail apart
        for group in opt.param_groups:
            group.update(lr=1e-3, weight_decay=0.1)
        steps = torch.Generator().manual_seed(4)
        for _ in range(3):
            for g in opt.main_grads:
                g.copy_(torch.randn(g.shape, generator=steps))
            opt.step(1.0, skip=False)
        runs[name] = opt.state_dict()
    for key, whole in runs["whole"].items():
        split = runs["slices"][key]
        assert torch.equal(entry_master(split).view(torch.int32), whole["param"].view(torch.int32)), key
        for m in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(split[m], whole[m]), (key, m)


@pytest.mark.unit
def test_a_torchrun_rank_takes_its_process_group_down_when_it_ends(monkeypatch):
    """Left to the interpreter's exit, gloo's threads once outlived the group and a rank that had saved
    died with SIGABRT (status 134). One process without torchrun keeps its group for the next train()."""
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    if dist.is_initialized():  # an earlier test's one-process group: this rank starts its own
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    for name, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    assert training.main([*TINY, "--train-iters", "1", "--mock-data"]) == 0
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    assert training.main([*TINY, "--train-iters", "1", "--mock-data"]) == 0
    assert dist.is_initialized()  # one process: the group stays
