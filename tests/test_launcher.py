"""Tests for examples/run.sh: argument validation and one tiny training run."""
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(REPO_ROOT, "examples", "run.sh")
LOG_NAME = re.compile(
    r"^log_(?P<method>[a-z-]+)_l-(?P<l>\d+)_hs-(?P<hs>\d+)_bs-(?P<bs>\d+)_ws-(?P<ws>\d+)_\d{8}-\d{6}\.txt$"
)


def run_launcher(args, results_dir, timeout=60):
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(results_dir))
    return subprocess.run(
        ["bash", RUN_SH, *args],
        env=env,
        cwd=str(results_dir),  # the launcher must work from any directory
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["-m", "foo"], 2, r"unknown method 'foo'.*megatron-lm.*stronghold"),
        (["-l"], 2, r"option -l requires a value"),
        (["-l", "-b", "2"], 2, r"option -l requires a value"),
        (["-l", "abc"], 2, r"-l \(layers\) must be a positive integer, got 'abc'"),
        (["-l", "0"], 2, r"-l \(layers\) must be a positive integer, got '0'"),
        (["-l", "-3"], 2, r"-l \(layers\) must be a positive integer, got '-3'"),
        (["-b", "x"], 2, r"-b \(batch size\) must be a positive integer"),
        (["-x"], 2, r"unknown option '-x'"),
        (["--", "--num-attention-heads", "many"], 2, r"--num-attention-heads must be a positive integer"),
        (
            ["-h", "100", "--", "--num-attention-heads", "16"],
            2,
            r"hidden size 100 is not divisible by the number of attention heads 16",
        ),
    ],
)
def test_bad_input_is_rejected(tmp_path, args, status, message):
    result = run_launcher(args, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == status, output
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in output
    assert "running:" not in output  # no training command was started
    assert list(tmp_path.iterdir()) == []  # and no log written


def test_help(tmp_path):
    for flag in ("--help", "-?"):
        result = run_launcher([flag], tmp_path)
        assert result.returncode == 0, result.stderr
        assert "Usage:" in result.stdout
        assert "-h HIDDEN" in result.stdout


def dry_run_command(tmp_path, args):
    result = run_launcher(["--dry-run", *args], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = [line.split("running: ", 1)[1].split() for line in result.stdout.splitlines() if "running: " in line]
    return result, commands


def flag_value(command, flag):
    """The value argparse would see: the last occurrence wins."""
    positions = [i for i, word in enumerate(command) if word == flag]
    assert positions, f"{flag} missing from {command}"
    return command[positions[-1] + 1]


def test_dry_run_builds_the_command(tmp_path):
    result, commands = dry_run_command(
        tmp_path,
        ["-m", "stronghold", "-l", "3", "-h", "96", "-b", "2", "-w", "5", "--",
         "--num-attention-heads", "6", "--seq-length", "64", "--global-batch-size", "8"],
    )
    assert len(commands) == 1
    command = commands[0]
    assert command[0] == sys.executable and command[1] == "pretrain_gpt.py"
    assert flag_value(command, "--num-layers") == "3"
    assert flag_value(command, "--hidden-size") == "96"
    assert flag_value(command, "--num-attention-heads") == "6"
    assert flag_value(command, "--max-position-embeddings") == "64"  # follows --seq-length
    assert flag_value(command, "--micro-batch-size") == "2"
    assert flag_value(command, "--global-batch-size") == "8"  # the user's value comes last
    assert flag_value(command, "--offload-method") == "stronghold"
    assert flag_value(command, "--window-size") == "5"
    assert "--mock-data" not in command  # mock data only when the user gives no --data-path
    log = result.stdout.split("log would be: ", 1)[1].split()[0]
    assert os.path.dirname(log) == str(tmp_path)
    assert LOG_NAME.match(os.path.basename(log)).groupdict() == {
        "method": "stronghold", "l": "3", "hs": "96", "bs": "2", "ws": "5"}


def test_dry_run_all_and_torchrun(tmp_path):
    import torch

    from megatron.stronghold.methods.registry import SPECS

    result, commands = dry_run_command(tmp_path, ["-m", "all", "-l", "2", "-h", "64", "-n", "2"])
    gpu = torch.cuda.is_available()
    assert [flag_value(c, "--offload-method") for c in commands] == [
        s.name for s in SPECS if gpu or not s.needs_cuda]  # megatron-lm, (megatron-offload,) l2l, zero-*, stronghold
    assert gpu or "megatron-offload needs a CUDA GPU: not run" in result.stdout
    for command in commands:
        assert command[1:5] == ["-m", "megatron.stronghold.torchrun", "--standalone", "--nproc-per-node"]
        assert flag_value(command, "--global-batch-size") == "8"  # 4 per process x 2


def test_small_model_without_gpu(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("without a CUDA GPU only: with one the paper sizes are used")
    result, (command,) = dry_run_command(tmp_path, [])
    assert "no GPU" in result.stdout
    assert flag_value(command, "--num-layers") == "4"
    assert flag_value(command, "--hidden-size") == "128"
    assert flag_value(command, "--num-attention-heads") == "4"
    assert flag_value(command, "--seq-length") == "128"
    assert "--bf16" not in command


def test_tiny_training_run_writes_log(tmp_path):
    result = run_launcher(
        ["-m", "megatron-lm", "-l", "2", "-h", "64", "-b", "2", "--",
         "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
         "--train-iters", "3", "--log-interval", "1"],
        tmp_path,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    logs = [p for p in tmp_path.iterdir() if LOG_NAME.match(p.name)]
    assert len(logs) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert logs[0].name.startswith("log_megatron-lm_l-2_hs-64_bs-2_ws-4_")
    assert re.search(r" iteration\s+3/", logs[0].read_text()), logs[0].read_text()[-3000:]
    assert f"log: {logs[0]}" in result.stdout


TINY_RUN = ["-m", "stronghold", "-l", "2", "-h", "64", "-b", "2", "--", "--num-attention-heads", "4",
            "--seq-length", "32", "--max-position-embeddings", "32", "--train-iters", "3", "--log-interval", "1"]


def test_a_missing_data_path_stops_the_launcher(tmp_path):
    """The launcher's defaults must not replace the user's data with mock data."""
    result = run_launcher([*TINY_RUN, "--data-path", str(tmp_path / "nowhere")], tmp_path, timeout=300)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr  # the launcher tees the run's stderr into its log
    assert "nowhere.bin" in output and "Traceback" not in output


def test_the_launcher_trains_on_the_users_data(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join('{"text": "%s"}' % ("the quick brown fox %d " % i * 20) for i in range(50)))
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "preprocess_data.py"), "--input", str(corpus),
                    "--output-prefix", str(tmp_path / "corpus"), "--tokenizer-type", "ByteLevelTokenizer",
                    "--append-eod"], check=True, capture_output=True)
    prefix = str(tmp_path / "corpus_text_document")
    result = run_launcher([*TINY_RUN, "--data-path", prefix, "--tokenizer-type", "ByteLevelTokenizer",
                           "--split", "100,0,0"], tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"data: {prefix} |" in result.stdout
    assert "data: mock" not in result.stdout


@pytest.mark.parametrize("flags", [["--train-iters", "1"], ["--train-iters", "2"], ["--lr", "0"]])
def test_the_users_flags_win_over_the_launchers_defaults(tmp_path, flags):
    """The launcher's warmup (2 iterations) and minimum learning rate (1e-5) give way to the user's
    --train-iters and --lr instead of tripping megatron-core's scheduler asserts."""
    result = run_launcher([*TINY_RUN, *flags], tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "summary |" in output


@pytest.mark.parametrize("flags,message", [
    (["--lr=-1e-4"], "--lr must be >= 0"),
    (["--min-lr", "1e-3", "--lr", "1e-4"], "--min-lr 0.001 is above --lr 0.0001"),
    (["--lr-warmup-iters", "3", "--train-iters", "3"], "--lr-warmup-iters 3 must be >= 0 and below"),
])
def test_values_the_scheduler_would_assert_on_are_refused_with_a_message(tmp_path, flags, message):
    result = run_launcher([*TINY_RUN, *flags], tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert message in output and "Traceback" not in output


@pytest.mark.parametrize("flags,message", [
    (["--exp-avg-dtype", "bf16"], "--exp-avg-dtype bf16 needs --use-precision-aware-optimizer"),
    (["--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "fp8"],
     "--exp-avg-sq-dtype fp8 is not implemented here; choose one of fp32, bf16"),
    (["--use-precision-aware-optimizer", "--main-grads-dtype", "bf16"],  # TINY_RUN is fp32 on a CPU
     "--main-grads-dtype bf16 needs --bf16"),
    (["--offload-method", "zero-offload", "--use-precision-aware-optimizer", "--exp-avg-dtype", "bf16"],
     "zero-offload keeps DeepSpeed's own optimizer states; the precision-aware optimizer is built for "
     "megatron-lm, l2l, stronghold"),
])
def test_optimizer_dtypes_not_built_are_refused_with_a_message(tmp_path, flags, message):
    result = run_launcher([*TINY_RUN, *flags], tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert message in output and "Traceback" not in output


def _launch_until_iteration(args, cwd, results_dir):
    """examples/run.sh ARGS in a process group of its own, once its run has logged iteration 2."""
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(results_dir))
    proc = subprocess.Popen(["bash", RUN_SH, *args], env=env, cwd=str(cwd), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r" iteration\s+2/", line):
            return proc, lines
    raise AssertionError("".join(lines)[-3000:])


def _start_and_wait_for_iteration(tmp_path, save, launcher_args=()):
    """A long tiny run saving into SAVE, once it has logged an iteration."""
    args = [*launcher_args, *TINY_RUN[:-4], "--train-iters", "100000", "--log-interval", "1", "--save", str(save)]
    return _launch_until_iteration(args, tmp_path, tmp_path)


@pytest.mark.parametrize("to_group,signum", [(True, "SIGINT"), (True, "SIGTERM"), (False, "SIGTERM")])
def test_a_signal_to_the_launcher_saves_and_ends_the_run(tmp_path, to_group, signum):
    """Ctrl-C (SIGINT to the process group), SIGTERM to the group or to the launcher alone: the run
    finishes its iteration, saves, exits 0, and the log keeps every line up to the exit line."""
    import signal

    save = tmp_path / "ckpt"
    proc, lines = _start_and_wait_for_iteration(tmp_path, save)
    sig = getattr(signal, signum)
    if to_group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=300)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output[-3000:]
    assert (save / "latest_checkpointed_iteration.txt").is_file(), output[-3000:]
    (log,) = [p for p in tmp_path.iterdir() if LOG_NAME.match(p.name)]
    text = log.read_text()
    assert "successfully saved checkpoint" in text, text[-2000:]
    assert text.rstrip().endswith("exited with status 0"), text[-2000:]
    import psutil  # nothing of the run is left behind

    assert not [p.pid for p in psutil.process_iter(["cmdline"]) if str(save) in " ".join(p.info["cmdline"] or [])]


def _assert_saved_and_logged_whole(tmp_path, save):
    """The run saved, and its log ends with the launcher's exit line of a run that ended well."""
    assert (save / "latest_checkpointed_iteration.txt").is_file()
    (log,) = [p for p in tmp_path.iterdir() if LOG_NAME.match(p.name)]
    text = log.read_text()
    assert "successfully saved checkpoint" in text, text[-2000:]
    assert text.rstrip().endswith("exited with status 0"), text[-2000:]


def test_the_run_survives_its_terminal(tmp_path):
    """The terminal closes (an ssh session drops): the launcher's process group gets SIGHUP and every
    write to the terminal fails (EIO). The run saves and exits 0, and its log is whole."""
    import pty
    import signal
    import time

    master, terminal = pty.openpty()
    save = tmp_path / "ckpt"
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path))
    args = [*TINY_RUN[:-4], "--train-iters", "100000", "--log-interval", "1", "--save", str(save)]
    proc = subprocess.Popen(["bash", RUN_SH, *args], env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                            stdout=terminal, stderr=terminal, start_new_session=True)
    os.close(terminal)
    seen, deadline = b"", time.monotonic() + 120
    while not re.search(rb" iteration\s+2/", seen) and time.monotonic() < deadline:
        seen += os.read(master, 65536)
    os.killpg(proc.pid, signal.SIGHUP)
    os.close(master)  # the terminal is gone: writes to it fail from now on
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")[-2000:]
    _assert_saved_and_logged_whole(tmp_path, save)


def test_ctrl_c_on_a_piped_launcher_keeps_the_log_whole(tmp_path):
    """`examples/run.sh ... | tee out` and Ctrl-C: SIGINT reaches the launcher and the reader of its pipe,
    which dies. The run saves, the launcher exits 0, and its log keeps every line to the exit line."""
    import signal

    save = tmp_path / "ckpt"
    proc, _ = _start_and_wait_for_iteration(tmp_path, save)
    proc.stdout.close()  # the pipe's reader is gone
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's foreground process group
    assert proc.wait(timeout=300) == 0
    _assert_saved_and_logged_whole(tmp_path, save)


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_a_signal_to_a_data_parallel_launcher_saves_and_ends_the_run(tmp_path, signum):
    """-n 2: the signal reaches both workers (not torchrun, which would answer it with a traceback and
    kill them 30 s later); they stop after the same iteration, save, and the launcher exits 0."""
    import signal

    save = tmp_path / "ckpt"
    proc, lines = _start_and_wait_for_iteration(tmp_path, save, ["-n", "2"])
    os.killpg(proc.pid, getattr(signal, signum))
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]
    _assert_saved_and_logged_whole(tmp_path, save)


def test_three_processes_train_a_tiny_model_on_a_cpu(tmp_path):
    """The host reserve follows the device: -n 3 of a 126 k-parameter model runs on a CPU (it was once
    refused for "needing 8.5 GiB of host memory")."""
    result = run_launcher(["-n", "3", "-m", "megatron-lm", "-l", "2", "-h", "64", "-b", "1", "--",
                           "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "32",
                           "--train-iters", "2"], tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert re.search(r" iteration\s+2/\s+2 \|", output), output[-3000:]


def test_bad_input_with_several_processes_is_one_message_and_status_2(tmp_path):
    """Every rank refuses the same flags: the message once, no torchrun traceback, the launcher exits 2."""
    flags = ["--use-precision-aware-optimizer", "--exp-avg-sq-dtype", "fp8"]
    result = run_launcher(["-n", "2", *TINY_RUN, *flags], tmp_path, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count("error: --exp-avg-sq-dtype fp8 is not implemented here") == 1, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]


def test_ctrl_c_during_all_methods_stops_after_the_current_one(tmp_path):
    """-m all: Ctrl-C ends the running method, and no further method starts."""
    import signal

    args = ["-m", "all", *TINY_RUN[2:-4], "--train-iters", "100000", "--log-interval", "1"]
    proc, lines = _launch_until_iteration(args, tmp_path, tmp_path / "all")
    os.killpg(proc.pid, signal.SIGINT)
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    assert "stopped by a signal: the remaining methods were not run" in output, output[-2000:]
    logs = [p.name for p in (tmp_path / "all").iterdir() if LOG_NAME.match(p.name)]
    assert len(logs) == 1 and logs[0].startswith("log_megatron-lm_"), logs


def test_a_run_killed_by_the_kernel_is_reported_by_name(tmp_path):
    """SIGKILL to the training process (what the out-of-memory killer sends): the launcher names the
    signal and its likely cause, in the terminal and at the end of the log."""
    import signal

    proc, lines = _start_and_wait_for_iteration(tmp_path, tmp_path / "ckpt")
    children = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "pretrain_gpt.py"], capture_output=True,
                              text=True).stdout.split()
    assert len(children) == 1, children
    os.kill(int(children[0]), signal.SIGKILL)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 137, out[-3000:]
    assert "exited with status 137 (killed by SIGKILL: unless someone sent it, the kernel's out-of-memory" in out
    assert re.search(r"the last host RSS seen was \d+\.\d GiB of \d+\.\d GiB", out), out[-2000:]
    log = next(tmp_path.glob("log_stronghold_*.txt")).read_text()
    assert "killed by SIGKILL" in log.splitlines()[-1]
    from megatron.stronghold.logs import parse_log
    assert parse_log(log).exit_status == 137  # tools/extract_results.py reads how a run ended


def test_sizes_after_the_double_dash_name_the_log(tmp_path):
    """--num-layers/--hidden-size/--micro-batch-size/--window-size after -- are the run's sizes (they win in
    pretrain_gpt.py), so the log is named by them, not by the launcher's defaults (an 8-layer hidden-4096 run
    was logged as l-16_hs-2048)."""
    result, (command,) = dry_run_command(tmp_path, ["-m", "stronghold", "-l", "16", "--", "--num-layers", "3",
                                                    "--hidden-size", "96", "--micro-batch-size", "2",
                                                    "--window-size", "1"])
    log = result.stdout.split("log would be: ", 1)[1].split()[0]
    assert LOG_NAME.match(os.path.basename(log)).groupdict() == {
        "method": "stronghold", "l": "3", "hs": "96", "bs": "2", "ws": "1"}
    assert flag_value(command, "--num-layers") == "3"
