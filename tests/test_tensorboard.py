"""TensorBoard through examples/run.sh with Megatron-LM's flags: the event files, read back with
tensorboard's EventAccumulator, hold the iteration lines' values, the validation losses and, for
stronghold, the summary line's executor timers and link volume."""

import re

import pytest

from megatron.stronghold.logs import parse_fields, parse_log
from test_launcher import run_launcher

pytestmark = pytest.mark.integration

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ITERS = 4
TINY = ["-m", "stronghold", "-l", "2", "-h", "64", "-b", "2", "--", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--log-interval", "1",
        "--train-iters", str(ITERS), "--eval-interval", "2", "--eval-iters", "1"]


def test_event_files_hold_the_logged_values(tmp_path):
    events = tmp_path / "tb"
    result = run_launcher([*TINY, "--tensorboard-dir", str(events), "--log-timers-to-tensorboard",
                           "--log-memory-to-tensorboard"], tmp_path, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    log = parse_log(result.stdout)
    assert [row["iteration"] for row in log.iterations] == list(range(1, ITERS + 1))

    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
    accumulator.Reload()

    def scalars(tag):
        return {event.step: event.value for event in accumulator.Scalars(tag)}

    for tag, field, rel, abs_ in (("lm loss", "lm loss", 1e-6, 0), ("learning-rate", "learning rate", 1e-6, 0),
                                  ("grad-norm", "grad norm", 1e-6, 1e-6), ("loss-scale", "loss scale", 0, 0),
                                  ("samples-per-second", "samples per second", 1e-6, 1e-3),
                                  ("throughput", "TFLOP/s per GPU", 1e-6, 1e-3)):
        logged = {row["iteration"]: row[field] for row in log.iterations}
        assert scalars(tag) == pytest.approx(logged, rel=rel, abs=abs_), tag
    logged_ms = {row["iteration"]: row["elapsed time per iteration (ms)"] for row in log.iterations}
    assert {k: v * 1000 for k, v in scalars("iteration-time").items()} == pytest.approx(logged_ms, abs=0.051)
    samples = {row["consumed samples"]: row["lm loss"] for row in log.iterations}
    assert scalars("lm loss vs samples") == pytest.approx(samples, rel=1e-6)

    validation = {int(m.group(1)): parse_fields(m.group(2))["lm loss value"] for m in re.finditer(
        r" validation loss at iteration (\d+) \|(.*)$", result.stdout, re.M)}
    assert sorted(validation) == [2, 4]
    assert scalars("lm loss validation") == pytest.approx(validation, rel=1e-6)

    # The executor's counters per iteration: their mean over the run is the summary line's figure.
    for field in ("host-to-device (MiB/iter)", "device-to-host (MiB/iter)"):
        per_iteration = scalars(field)
        assert sorted(per_iteration) == list(range(1, ITERS + 1)) and log.summary[field] > 0
        assert sum(per_iteration.values()) / ITERS == pytest.approx(log.summary[field], abs=1e-3), field
    for field in ("cpu work (ms/iter)", "waits for cpu (ms/iter)", "copy waits (ms/iter)"):
        assert sorted(scalars(field)) == list(range(1, ITERS + 1)), field
        assert sum(scalars(field).values()) / ITERS <= log.summary[field] + 1e-3, field  # shutdown adds its wait
    rss = scalars("mem-host-max-rss-bytes")
    assert sorted(rss) == list(range(1, ITERS + 1))
    assert max(rss.values()) / 2 ** 30 <= log.summary["peak host RSS (GiB)"] + 1e-3


def test_a_tensorboard_dir_that_cannot_be_written_is_refused(tmp_path):
    from megatron.stronghold import arguments, training

    blocker = tmp_path / "file"
    blocker.write_text("")
    # Flags are checked by parse_args; the directory when the run opens it, before the model is built.
    args = arguments.parse_args(["--mock-data", "--tensorboard-dir", str(blocker / "tb")])
    with pytest.raises(arguments.ArgumentError, match=f"--tensorboard-dir {blocker / 'tb'}: cannot create"):
        training.train(args)
    with pytest.raises(arguments.ArgumentError, match="--tensorboard-log-interval must be a positive integer"):
        arguments.parse_args(["--mock-data", "--tensorboard-dir", str(tmp_path), "--tensorboard-log-interval", "0"])
