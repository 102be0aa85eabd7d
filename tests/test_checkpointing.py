"""Checkpoints: a resumed run equals an uninterrupted one, for every method and across methods, and
every way a run can end (kill while saving, SIGTERM, bad --load, non-finite loss) ends safely.

Tiny fp32 models on the CPU, as in test_stronghold_exactness.py. The subprocess tests run
pretrain_gpt.py itself, so they see the real exit status and stderr.
"""

import functools
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.access(sys.prefix, os.W_OK):  # DeepSpeed's CPU Adam is built once, as in test_zero_baselines.py
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

from megatron.stronghold import arguments, checkpointing, run_control, training  # noqa: E402
from megatron.stronghold.model import build_model  # noqa: E402

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 20
RTOL = 1e-6  # a resumed run repeats the same arithmetic: measured bit-identical on CPU
CROSS_RTOL = 1e-5  # another method's first 10 steps: test_stronghold_exactness.py's tolerance
FLAGS = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--train-iters", str(ITERS), "--lr", "3e-3", "--min-lr", "3e-4",
         "--lr-warmup-iters", "3", "--lr-decay-style", "cosine", "--weight-decay", "0.1", "--seed", "7",
         "--mock-data", "--log-interval", "5"]
BF16_MOMENTS = ("--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16", "--exp-avg-sq-dtype", "bf16")
METHODS = {
    "megatron-lm": (),
    "stronghold": ("--resident-layers", "1", "--window-size", "1"),  # 2 of 3 layers streamed
    "l2l": (),
}


def run(method, *extra):
    return training.train(arguments.parse_args([*FLAGS, "--offload-method", method, *METHODS[method], *extra]))


@functools.lru_cache(maxsize=None)
def uninterrupted(method, extra=()):
    history = run(method, *extra)
    assert len(history.losses) == ITERS
    return history


def assert_continues(reference, first, second, rtol=RTOL):
    """first + second (a run stopped and resumed) trained like reference (uninterrupted)."""
    assert len(first.losses) + len(second.losses) == ITERS
    n = len(first.losses)
    assert first.losses == reference.losses[:n]
    for it, (a, b) in enumerate(zip(reference.losses[n:], second.losses), n + 1):
        assert b == pytest.approx(a, rel=rtol), f"lm loss differs at iteration {it}"
    for it, (a, b) in enumerate(zip(reference.grad_norms[n:], second.grad_norms), n + 1):
        assert b == pytest.approx(a, rel=rtol, nan_ok=True), f"grad norm differs at iteration {it}"
    assert second.lrs == pytest.approx(reference.lrs[n:], rel=1e-12)
    assert second.loss_scales == reference.loss_scales[n:]
    assert second.skipped == reference.skipped[n:]


@pytest.mark.parametrize("method,extra", [
    ("megatron-lm", ()),
    ("stronghold", ()),
    ("l2l", ()),
    # fp16: the loss scale (with overflow skips early on) must resume too
    ("megatron-lm", ("--fp16", "--initial-loss-scale", str(2.0 ** 20), "--hysteresis", "1")),
    ("stronghold", ("--global-batch-size", "4")),  # gradient accumulation
    ("stronghold", ("--bf16",)),  # loading must refresh the bf16 weights from the masters (as remainders)
    ("stronghold", ("--bf16", *BF16_MOMENTS)),
    ("megatron-lm", BF16_MOMENTS),
], ids=["megatron-lm", "stronghold", "l2l", "megatron-lm-fp16", "stronghold-accumulation", "stronghold-bf16",
        "stronghold-bf16-moments", "megatron-lm-bf16-moments"])
def test_save_and_resume_equals_uninterrupted(tmp_path, method, extra):
    first = run(method, *extra, "--save", str(tmp_path), "--exit-interval", "10")
    assert first.exit_code == 0 and len(first.losses) == 10
    assert checkpointing.find_checkpoint(str(tmp_path))[0] == 10
    second = run(method, *extra, "--load", str(tmp_path))
    assert_continues(uninterrupted(method, extra), first, second)
    if "--fp16" in extra:
        assert any(uninterrupted(method, extra).skipped)


@pytest.mark.parametrize("writer,reader,extra", [
    ("stronghold", "megatron-lm", ()), ("megatron-lm", "stronghold", ()), ("l2l", "stronghold", ()),
    ("stronghold", "megatron-lm", BF16_MOMENTS), ("megatron-lm", "stronghold", BF16_MOMENTS),
])
def test_checkpoint_loads_into_another_method(tmp_path, writer, reader, extra):
    first = run(writer, *extra, "--save", str(tmp_path), "--exit-interval", "10")
    second = run(reader, *extra, "--load", str(tmp_path))
    assert first.losses == uninterrupted(writer, extra).losses[:10]
    reference = uninterrupted(reader, extra)
    for it, (a, b) in enumerate(zip(reference.losses[10:], second.losses), 11):
        assert b == pytest.approx(a, rel=CROSS_RTOL), f"lm loss differs at iteration {it}"
    assert second.lrs == pytest.approx(reference.lrs[10:], rel=1e-12)


def test_masters_stored_as_remainders_read_back_bit_for_bit(tmp_path, capsys):
    """bf16: a checkpoint keeps a streamed master as its bf16 weight and remainder (no fp32 copy of the
    store at save time); readers get the fp32 master of a run that kept it whole, bit for bit, and a
    run with fp32 Adam moments resumes from bf16 ones, converting them with a log line."""
    weights, moments = {}, {}
    for name, extra in (("split", BF16_MOMENTS), ("whole", (*BF16_MOMENTS, "--no-store-param-remainders"))):
        run("stronghold", "--bf16", "--resident-layers", "0", "--save", str(tmp_path / name), "--exit-interval", "5",
            *extra)
        state = checkpointing.format.read_checkpoint(str(tmp_path / name / "iter_0000005"), 5)
        weights[name] = checkpointing.checkpoint_weights(state)
        moments[name] = state["optimizer"]
    layer = "decoder.layers.0.mlp.linear_fc1.weight"
    assert moments["split"][layer]["exp_avg"].dtype == torch.bfloat16
    assert "master_remainder" in moments["split"][layer] and "master_remainder" not in moments["whole"][layer]
    assert weights["split"].keys() == weights["whole"].keys()
    for key, whole in weights["whole"].items():
        assert weights["split"][key].dtype == torch.float32 and torch.equal(weights["split"][key], whole), key
    resumed = run("stronghold", "--bf16", "--resident-layers", "0", "--load", str(tmp_path / "split"))
    assert len(resumed.losses) == ITERS - 5
    assert "Adam moments were converted to this run's dtypes (--exp-avg-dtype bf16 -> fp32" in capsys.readouterr().out


def test_a_run_never_writes_over_newer_checkpoints(tmp_path, capsys):
    """--save D with checkpoints in D: without --load (a restart that forgot it), or resuming an older
    iteration into D, the run is refused before the model is built, and D is left as it was."""
    base = [*FLAGS, "--offload-method", "megatron-lm", "--save", str(tmp_path)]
    assert training.main([*base, "--save-interval", "2", "--exit-interval", "4"]) == 0
    before = {p: os.path.getmtime(os.path.join(tmp_path, p)) for p in sorted(os.listdir(tmp_path))}
    capsys.readouterr()
    assert training.main(base) == 2
    assert "already holds checkpoints (newest: iteration 4)" in capsys.readouterr().err
    assert training.main([*base, "--load", str(tmp_path), "--ckpt-step", "2"]) == 2
    assert "holds iteration 4, newer than the iteration this run starts from (2)" in capsys.readouterr().err
    assert {p: os.path.getmtime(os.path.join(tmp_path, p)) for p in sorted(os.listdir(tmp_path))} == before
    assert checkpointing.find_checkpoint(str(tmp_path))[0] == 4
    resumed = training.main([*base, "--load", str(tmp_path), "--exit-interval", "6"])  # the newest: resumes
    assert resumed == 0 and checkpointing.find_checkpoint(str(tmp_path))[0] == 6


def test_resume_with_another_schedule_is_refused_unless_a_flag_says_which(tmp_path, capsys):
    """Megatron-LM's rule: a resume whose schedule flags differ from the checkpoint's stops, listing the
    differences; --override-opt_param-scheduler follows the flags, --use-checkpoint-opt_param-scheduler
    the checkpoint."""
    run("megatron-lm", "--save", str(tmp_path), "--exit-interval", "10")
    other = ("--lr", "1e-2", "--min-lr", "1e-3", "--train-iters", str(ITERS + 10), "--weight-decay", "0")
    base = [*FLAGS, "--offload-method", "megatron-lm", "--load", str(tmp_path)]
    capsys.readouterr()
    assert training.main([*base, *other]) == 2
    err = capsys.readouterr().err
    assert "schedule differs from the checkpoint's (--lr 0.003 -> 0.01; --min-lr 0.0003 -> 0.001; " in err
    assert "--override-opt_param-scheduler" in err and "Traceback" not in err
    flags = training.train(arguments.parse_args([*base, *other, "--override-opt_param-scheduler"]))
    kept = training.train(arguments.parse_args([*base, *other, "--use-checkpoint-opt_param-scheduler"]))
    assert max(flags.lrs) > 3e-3  # the new peak, on the way down from 1e-2
    assert kept.lrs[:ITERS - 10] == pytest.approx(uninterrupted("megatron-lm").lrs[10:], rel=1e-12)
    # the checkpoint's weight decay from the first resumed step on (megatron-core reads it after the lr)
    assert kept.losses[:ITERS - 10] == pytest.approx(uninterrupted("megatron-lm").losses[10:], rel=RTOL)


def test_an_internal_error_while_loading_keeps_its_traceback(tmp_path, monkeypatch):
    """Only what the user can fix (a checkpoint that does not fit) is exit 2 without a traceback; a bug
    or an out-of-memory error while loading reaches the log whole."""
    from megatron.stronghold.methods import megatron_lm

    run("megatron-lm", "--save", str(tmp_path), "--exit-interval", "2")

    def broken(self, state):
        raise RuntimeError("internal: injected while loading")
    monkeypatch.setattr(megatron_lm.MegatronLM, "load_state_dict", broken)
    with pytest.raises(RuntimeError, match="internal: injected while loading"):
        training.main([*FLAGS, "--offload-method", "megatron-lm", "--load", str(tmp_path)])


def test_model_entry_is_a_megatron_core_state_dict(tmp_path):
    """The "model" entry loads strictly into a plain megatron-core GPTModel, with fp32 values."""
    run("stronghold", "--save", str(tmp_path), "--exit-interval", "2")
    _, path = checkpointing.find_checkpoint(str(tmp_path))
    state = torch.load(os.path.join(path, checkpointing.FILE), weights_only=True)
    args = arguments.parse_args(FLAGS)
    model = build_model(args, state["args"]["padded_vocab_size"])
    model.load_state_dict(state["model"], strict=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if torch.is_tensor(v))
    assert set(state["optimizer"]) == {n for n, _ in model.named_parameters()}
    assert {v["step"] for v in state["optimizer"].values()} == {2}


# ----- how a run ends (subprocesses) -----

def launch(*flags, env=None):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt.py"), *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


def wait_for_line(proc, text, timeout=120):
    """Read the process's stdout until a line contains text (kill it after timeout)."""
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if text in line:
                return line
    finally:
        watchdog.cancel()
    raise AssertionError(f"the process ended without printing {text!r}: {proc.stderr.read()[-2000:]}")


def test_killed_while_saving_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL after the iteration-4 checkpoint is written but before it is published: the pointer
    still names iteration 2, which resumes exactly; the next save replaces the leftovers."""
    save = str(tmp_path)
    proc = launch(*FLAGS, "--offload-method", "stronghold", *METHODS["stronghold"], "--save", save,
                  "--save-interval", "2", env={checkpointing.save._PAUSE_ENV: "4"})
    wait_for_line(proc, "test hook: pausing")
    assert os.path.isfile(os.path.join(save, "iter_0000004.tmp", checkpointing.FILE))
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    iteration, _ = checkpointing.find_checkpoint(save)
    assert iteration == 2 and not os.path.exists(checkpointing.iteration_dir(save, 4))

    resumed = run("stronghold", "--load", save, "--save", save, "--save-interval", "2", "--exit-interval", "6")
    reference = uninterrupted("stronghold")
    assert resumed.losses == pytest.approx(reference.losses[2:6], rel=RTOL)
    assert checkpointing.find_checkpoint(save)[0] == 6
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004", "iter_0000006", checkpointing.TRACKER]


@pytest.mark.parametrize("save", [True, False])
def test_sigterm_finishes_the_iteration_and_saves(tmp_path, save):
    flags = ["--train-iters", "100000", "--log-interval", "1"]
    if save:
        flags += ["--save", str(tmp_path)]
    proc = launch(*FLAGS, "--offload-method", "stronghold", *METHODS["stronghold"], *flags)
    wait_for_line(proc, "iteration        3/")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert "received SIGTERM: stopped after iteration" in out, err[-2000:]
    assert "Traceback" not in err
    if save:
        assert proc.returncode == 0
        iteration, _ = checkpointing.find_checkpoint(str(tmp_path))
        assert 3 <= iteration < 100000
        assert f"successfully saved checkpoint from iteration {iteration:7d}" in out
    else:
        assert proc.returncode == 128 + signal.SIGTERM


def test_bad_load_exits_2_with_a_message(tmp_path):
    good = str(tmp_path / "good")
    run("megatron-lm", "--save", good, "--exit-interval", "2")
    corrupt = str(tmp_path / "corrupt")
    shutil.copytree(good, corrupt)
    path = os.path.join(checkpointing.iteration_dir(corrupt, 2), checkpointing.FILE)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    unlisted = str(tmp_path / "unlisted")  # the same, without checksums: torch.load finds it
    shutil.copytree(corrupt, unlisted)
    os.remove(os.path.join(checkpointing.iteration_dir(unlisted, 2), "integrity.json"))
    pointer = str(tmp_path / "pointer")
    shutil.copytree(good, pointer)
    with open(os.path.join(pointer, checkpointing.TRACKER), "w") as f:
        f.write("7\n")  # names an iteration that is not there

    cases = {
        "does not fit this model: --num-layers 3 in the checkpoint, 4 here": ["--load", good, "--num-layers", "4"],
        "--hidden-size 32 in the checkpoint, 64 here": ["--load", good, "--hidden-size", "64"],
        "iter_0000002 is damaged: model_optim_rng.pt has": ["--load", corrupt],
        "corrupt or incomplete file": ["--load", unlisted],
        "names iteration 7": ["--load", pointer],
        "the directory does not exist": ["--load", str(tmp_path / "missing")],
        "ZeRO runs load only checkpoints written by the same ZeRO method":
            ["--load", good, "--offload-method", "zero-offload"],
        "--save-interval needs --save": ["--save-interval", "5"],
    }
    procs = {msg: launch(*FLAGS, *flags) for msg, flags in cases.items()}
    for msg, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (msg, err[-2000:])
        assert "error: " in err and msg in err, (msg, err[-2000:])
        assert "Traceback" not in err + out, msg


def test_load_of_save_dir_without_checkpoint_starts_fresh(tmp_path):
    """`--save D --load D` with an empty D: Megatron-LM's habit, trains from scratch."""
    got = run("megatron-lm", "--save", str(tmp_path), "--load", str(tmp_path), "--exit-interval", "3")
    assert got.losses == uninterrupted("megatron-lm").losses[:3]


@pytest.mark.parametrize("extra", [(), (*BF16_MOMENTS, "--clip-grad", "0")],  # bf16 moments: layers guess
                         ids=["fp32-moments", "bf16-moments-guessing"])
def test_non_finite_loss_stops_without_saving(tmp_path, extra):
    """An absurd learning rate: iteration 1 is fine, iteration 2's loss is NaN. The run stops with
    status 3 and the newest checkpoint stays iteration 1's."""
    got = run("stronghold", "--lr", "1e30", "--lr-warmup-iters", "0", "--lr-decay-style", "constant",
              "--save", str(tmp_path), "--save-interval", "1", *extra)
    assert got.exit_code == run_control.EXIT_NONFINITE
    assert len(got.losses) == 2 and got.losses[0] == got.losses[0] and got.losses[1] != got.losses[1]
    assert checkpointing.find_checkpoint(str(tmp_path))[0] == 1
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001", checkpointing.TRACKER]


@pytest.mark.parametrize("method", ["zero-offload", "zero-infinity"])
def test_zero_saves_and_resumes_through_deepspeed(tmp_path, method):
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8", "--lr", "2e-3",
             "--lr-warmup-iters", "2", "--lr-decay-style", "cosine", "--clip-grad", "1.6", "--log-interval", "4",
             "--offload-method", method]

    def zero(*extra):
        return training.train(arguments.parse_args([*flags, *extra]))

    full = zero()
    first = zero("--save", str(tmp_path), "--exit-interval", "4")
    files = os.listdir(checkpointing.iteration_dir(str(tmp_path), 4))
    assert checkpointing.FILE in files and any(f.endswith("optim_states.pt") for f in files)
    second = zero("--load", str(tmp_path))
    assert first.losses + second.losses == pytest.approx(full.losses, rel=RTOL)
    assert first.grad_norms + second.grad_norms == pytest.approx(full.grad_norms, rel=RTOL)
    other = "zero-infinity" if method == "zero-offload" else "zero-offload"
    with pytest.raises(arguments.ArgumentError, match=f"loads only into {method} runs"):
        training.train(arguments.parse_args([*flags[:-2], "--offload-method", other, "--load", str(tmp_path)]))
