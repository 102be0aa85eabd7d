"""Data parallelism over torch.distributed (gloo on CPU), launched by torchrun: two processes give
the same losses and gradient norms as one process at the same global batch."""

import json
import os
import re
import subprocess
import sys

import pytest

from megatron.stronghold.logs import parse_log

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Dropout on (0.1): each micro-batch draws its masks from its global index (rank r's micro-batch m is
# one process's micro-batch m x N + r), so one process and two draw the same masks for the same samples.
FLAGS = ["--num-layers", "3", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "8", "--log-interval", "1",
         "--lr", "3e-3", "--clip-grad", "0.5", "--mock-data"]


def run(nproc, method, *extra, iterations=8, flags=FLAGS):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = (launcher if nproc > 1 else [sys.executable]) + [os.path.join(ROOT, "pretrain_gpt.py"), *flags,
                                                          "--offload-method", method, *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = parse_log(proc.stdout)
    assert len(log.iterations) == iterations  # rank 0 logs, once
    store = re.search(r"host store: (\d+) of \d+ streamed layers.* = ([0-9.]+) B/param", proc.stdout)
    return log.series("lm loss"), log.series("grad norm"), store and (int(store.group(1)), float(store.group(2)))


@pytest.mark.parametrize("method,extra", [
    ("megatron-lm", ()),
    ("stronghold", ("--window-size", "1")),  # one micro-batch per rank: averaged before leaving the device
    ("stronghold", ("--window-size", "2", "--global-batch-size", "8")),  # two per rank, summed on the device
])
def test_two_processes_train_like_one(method, extra):
    one_loss, one_norm, one_store = run(1, method, *extra)
    two_loss, two_norm, two_store = run(2, method, *extra)
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert two_norm == pytest.approx(one_norm, rel=1e-5)
    assert max(one_norm) > 0.5  # clipping fires: the reduced global norm decides the step
    if method == "stronghold":
        # Rank 0 holds layers 0 and 2 of the three; the one process all of them.
        assert (one_store[0], two_store[0]) == (3, 2)
        # The gradient is summed over micro-batches on the device: 16 B/param however many there are.
        assert one_store[1] == two_store[1] == 16.0


def test_two_processes_fine_tune_on_chat_data_like_one(tmp_path):
    """--sft: rank r takes its share of each step's conversations, as with pre-training data."""
    from test_sft import TEMPLATE, conversations, tokenizer_dir, write_jsonl

    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    sft = [*[f for f in FLAGS if f != "--mock-data"], "--sft", "--data-path", data, "--split", "1,0,0",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir(tmp_path / "tok", TEMPLATE),
           "--seq-length", "24", "--max-position-embeddings", "24"]
    one_loss, one_norm, _ = run(1, "stronghold", "--window-size", "1", flags=sft)
    two_loss, two_norm, _ = run(2, "stronghold", "--window-size", "1", flags=sft)
    assert two_loss == pytest.approx(one_loss, rel=1e-5) and two_norm == pytest.approx(one_norm, rel=1e-5)


@pytest.mark.parametrize("method,extra", [("megatron-lm", ()), ("stronghold", ("--window-size", "1"))])
def test_tensor_parallel_two_ranks_train_like_one(method, extra):
    """TP=2 splits every layer over two ranks (megatron-core's parallel layers; each StrongHold rank
    streams only its shards) and must give the TP=1 losses and gradient norms. Dropout off: each rank
    draws the attention masks of its own heads, as in Megatron-LM, not those of one process."""
    # The vocabulary is padded to a multiple of 128 x TP: pad both runs to the same 512 entries.
    no_dropout = ("--hidden-dropout", "0", "--attention-dropout", "0")
    one_loss, one_norm, _ = run(1, method, "--make-vocab-size-divisible-by", "256", *no_dropout, *extra)
    two_loss, two_norm, _ = run(2, method, "--tensor-model-parallel-size", "2", *no_dropout, *extra)
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert two_norm == pytest.approx(one_norm, rel=1e-5)


def test_tensor_parallel_checkpoints_are_refused_for_now(tmp_path, monkeypatch):
    from megatron.stronghold import arguments

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(arguments.ArgumentError, match="not implemented yet"):
        arguments.parse_args([*FLAGS, "--tensor-model-parallel-size", "2", "--save", str(tmp_path)])


def test_data_parallel_checkpoint_resumes_at_any_data_parallel_size(tmp_path):
    """Each rank saves the streamed layers it owns into a part file of its own; the loader merges the
    parts, so a DP=2 checkpoint resumes with two processes or one and trains on as without the stop."""
    streamed = ("--window-size", "1")
    full, _, _ = run(2, "stronghold", *streamed)
    run(2, "stronghold", *streamed, "--save", str(tmp_path), "--save-interval", "4", "--exit-interval", "4",
        iterations=4)
    parts = sorted(os.listdir(tmp_path / "iter_0000004"))
    assert parts == ["integrity.json", "model_optim_rng.pt", "streamed_layers_rank_001.pt"]
    with open(tmp_path / "iter_0000004" / "integrity.json") as f:  # rank 1's part is checksummed too
        assert sorted(json.load(f)["files"]) == parts[1:]
    for nproc in (2, 1):
        resumed, _, _ = run(nproc, "stronghold", *streamed, "--load", str(tmp_path), iterations=4)
        assert resumed == pytest.approx(full[4:], rel=1e-5)
    megatron, _, _ = run(1, "megatron-lm", "--load", str(tmp_path), iterations=4)  # any method reads it
    assert megatron == pytest.approx(full[4:], rel=1e-5)


def test_more_ranks_than_streamed_layers():
    # One streamed layer, two ranks: rank 1 holds none of it and still takes part in its collectives.
    extra = ("--window-size", "1", "--resident-layers", "2")
    one_loss, one_norm, one_store = run(1, "stronghold", *extra)
    two_loss, two_norm, two_store = run(2, "stronghold", *extra)
    assert two_loss == pytest.approx(one_loss, rel=1e-5)
    assert two_norm == pytest.approx(one_norm, rel=1e-5)
    assert one_store[0] == two_store[0] == 1
