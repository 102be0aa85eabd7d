"""The --save directory through examples/run.sh: one writer at a time (a second run is refused, a dead
run's lock and partial save are taken over), a save that cannot be written ends the run with one
message and leaves the previous checkpoint, and two launchers never share a log file."""

import os
import re
import signal
import subprocess
import sys

import psutil
import pytest

from test_launcher import RUN_SH, run_launcher

pytestmark = pytest.mark.integration

TRACKER = "latest_checkpointed_iteration.txt"
TINY = ["-m", "stronghold", "-l", "2", "-h", "64", "-b", "2", "--", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--log-interval", "1"]


def output(result) -> str:
    return result.stdout + result.stderr


def test_a_second_writer_is_refused_and_a_dead_ones_leftovers_are_taken_over(tmp_path):
    save = tmp_path / "ckpt"
    # The first run saves iteration 2, then stops inside its save of iteration 4 (the checkpoint is
    # written, not yet published), as a run caught by kill -9 at that moment would.
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path),
               STRONGHOLD_TEST_SAVE_PAUSE_AT="4")
    first = subprocess.Popen(["bash", RUN_SH, *TINY, "--train-iters", "100000", "--save", str(save),
                              "--save-interval", "2"], env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if "test hook: pausing" in line:
            break
    assert (save / "iter_0000004.tmp").is_dir(), "".join(lines)[-3000:]
    holder = [p for p in psutil.process_iter(["cmdline"]) if "pretrain_gpt.py" in " ".join(p.info["cmdline"] or [])
              and str(save) in " ".join(p.info["cmdline"])]
    assert len(holder) == 1

    second = run_launcher([*TINY, "--train-iters", "3", "--save", str(save)], tmp_path, timeout=300)
    assert second.returncode == 2, output(second)[-3000:]
    assert f"--save {save} is in use by another run (pid {holder[0].pid} on" in output(second), output(second)[-3000:]
    assert "Traceback" not in output(second) and "total parameters" not in output(second)  # refused before the model
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000004.tmp", TRACKER, "writer.lock"]

    holder[0].send_signal(signal.SIGKILL)  # the lock file and the partial save of iteration 4 stay behind
    first.communicate(timeout=120)
    assert "writer.lock" in os.listdir(save) and "iter_0000004.tmp" in os.listdir(save)

    third = run_launcher([*TINY, "--train-iters", "3", "--save", str(save), "--load", str(save),
                          "--override-opt_param-scheduler"], tmp_path,
                         timeout=300)
    assert third.returncode == 0, output(third)[-3000:]
    assert f"removed {save / 'iter_0000004.tmp'}: the partial checkpoint of a run that ended" in third.stdout
    assert sorted(os.listdir(save)) == ["iter_0000002", "iter_0000003", TRACKER]  # the lock goes with its run


def test_a_full_disk_stops_the_run_with_one_message_and_keeps_the_previous_checkpoint(tmp_path):
    """The second run may write files of at most 256 KiB (ulimit -f: its writes beyond fail with EFBIG,
    as they would with ENOSPC on a full disk), less than one checkpoint of this model."""
    save = tmp_path / "ckpt"
    first = run_launcher([*TINY, "--train-iters", "2", "--save", str(save)], tmp_path, timeout=300)
    assert first.returncode == 0, output(first)[-3000:]

    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path))
    args = [*TINY, "--train-iters", "4", "--save", str(save), "--load", str(save), "--save-interval", "2",
            "--override-opt_param-scheduler"]
    limited = subprocess.run(["bash", "-c", 'ulimit -f 256 && exec bash "$@"', "bash", RUN_SH, *args], env=env,
                             cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    text = output(limited)
    assert limited.returncode == 1, text[-3000:]
    assert "Traceback" not in text
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, text[-3000:]
    assert re.search(rf"error: cannot save the checkpoint of iteration 4 in {save}: File too large \(writing "
                     rf"{save}/iter_0000004.tmp/model_optim_rng.pt\).*The partial iter_0000004.tmp was removed; "
                     rf"{save}/{TRACKER} still names iteration 2", errors[0]), errors[0]
    assert sorted(os.listdir(save)) == ["iter_0000002", TRACKER]
    assert (save / TRACKER).read_text().strip() == "2"
    assert "method stronghold exited with status 1" in limited.stdout


def test_two_launchers_started_in_the_same_second_write_two_logs(tmp_path):
    """A `date` that always answers the same second: both launchers would name the same log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "date").write_text("#!/bin/sh\necho 20261202-120000\n")
    (bin_dir / "date").chmod(0o755)
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path), PATH=f"{bin_dir}:{os.environ['PATH']}")
    runs = [subprocess.Popen(["bash", RUN_SH, *TINY, "--train-iters", "1", "--data-path", str(tmp_path / name)],
                             env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True) for name in ("first", "second")]
    for run in runs:
        run.communicate(timeout=300)
        assert run.returncode == 2  # no such data: each run stops at once, in its own log
    logs = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("log_"))
    assert logs == ["log_stronghold_l-2_hs-64_bs-2_ws-4_20261202-120000-2.txt",
                    "log_stronghold_l-2_hs-64_bs-2_ws-4_20261202-120000.txt"]
    texts = [(tmp_path / name).read_text() for name in logs]
    assert sorted(("first.bin" in t, "second.bin" in t) for t in texts) == [(False, True), (True, False)]
    for text in texts:
        assert text.count("exited with status 2") == 1, text
