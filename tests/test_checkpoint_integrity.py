"""Every checkpoint file is checked against the SHA-256 written at save before it is read: a damaged
checkpoint is refused, naming the newest intact one, and --ckpt-step N resumes from that one."""

import json
import os
import sys

import pytest
import torch

from test_launcher import run_launcher

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.access(sys.prefix, os.W_OK):  # DeepSpeed's CPU Adam is built once, as in test_zero_baselines.py
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))

from megatron.stronghold import arguments, checkpointing, training  # noqa: E402
from megatron.stronghold.checkpointing import integrity  # noqa: E402

pytestmark = pytest.mark.integration

TINY = ["-m", "stronghold", "-l", "2", "-h", "64", "-b", "2", "--", "--num-attention-heads", "4",
        "--seq-length", "32", "--max-position-embeddings", "32", "--log-interval", "1"]
FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--micro-batch-size", "2", "--mock-data", "--log-interval", "1"]


def output(result) -> str:
    return result.stdout + result.stderr


def damage(path, nbytes=4096) -> None:
    """Overwrite nbytes in the middle of the file, inside its tensor data."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(nbytes))


def test_a_damaged_checkpoint_is_refused_and_an_older_one_resumes_with_ckpt_step(tmp_path):
    save = tmp_path / "ckpt"
    first = run_launcher([*TINY, "--train-iters", "4", "--save", str(save), "--save-interval", "2"], tmp_path,
                         timeout=300)
    assert first.returncode == 0, output(first)[-3000:]
    damage(save / "iter_0000004" / "model_optim_rng.pt")

    refused = run_launcher([*TINY, "--train-iters", "6", "--load", str(save)], tmp_path, timeout=300)
    text = output(refused)
    assert refused.returncode == 2, text[-3000:]
    assert (f"error: checkpoint {save}/iter_0000004 is damaged: model_optim_rng.pt does not match the SHA-256 in "
            f"integrity.json: its bytes changed after it was written. The newest intact checkpoint is iteration 2: "
            f"resume from it with --load {save} --ckpt-step 2") in text, text[-3000:]
    assert "Traceback" not in text and "total parameters" not in text  # refused before the model is built

    resumed = run_launcher([*TINY, "--train-iters", "3", "--load", str(save), "--ckpt-step", "2",
                            "--override-opt_param-scheduler"], tmp_path,
                           timeout=300)
    text = output(resumed)
    assert resumed.returncode == 0, text[-3000:]
    assert f"verified checkpoint {save}/iter_0000002: 1 files" in text
    assert "successfully loaded checkpoint" in text and " iteration        3/" in text
    assert " iteration        2/" not in text


def test_checkpoints_without_checksums_load_unverified(tmp_path, capsys):
    """Checkpoints written before integrity.json existed still load, and the log says they are unverified."""
    save = str(tmp_path)
    training.train(arguments.parse_args([*FLAGS, "--train-iters", "2", "--save", save]))
    os.remove(os.path.join(checkpointing.iteration_dir(save, 2), integrity.MANIFEST))
    capsys.readouterr()
    resumed = training.train(arguments.parse_args([*FLAGS, "--train-iters", "3", "--load", save,
                                                   "--override-opt_param-scheduler"]))
    assert len(resumed.losses) == 1
    assert "has no integrity.json (written before checkpoints carried checksums): loading it unverified" in \
        capsys.readouterr().out


def test_ckpt_step_must_name_a_checkpoint(tmp_path):
    save = str(tmp_path)
    training.train(arguments.parse_args([*FLAGS, "--train-iters", "2", "--save", save, "--save-interval", "1"]))
    with pytest.raises(arguments.ArgumentError, match=r"--ckpt-step 5: .*iter_0000005 holds no checkpoint "
                                                      r"\(iterations in .*: 1, 2\)"):
        training.train(arguments.parse_args([*FLAGS, "--load", save, "--ckpt-step", "5"]))
    with pytest.raises(arguments.ArgumentError, match="--ckpt-step needs --load DIR"):
        arguments.parse_args([*FLAGS, "--ckpt-step", "1"])


def test_deepspeed_files_are_checksummed_too(tmp_path):
    flags = [*FLAGS, "--hidden-size", "64", "--offload-method", "zero-offload", "--train-iters", "2"]
    training.train(arguments.parse_args([*flags, "--save", str(tmp_path)]))
    path = checkpointing.iteration_dir(str(tmp_path), 2)
    with open(os.path.join(path, integrity.MANIFEST)) as f:
        listed = sorted(json.load(f)["files"])
    assert listed == sorted(set(os.listdir(path)) - {integrity.MANIFEST})
    assert any(name.endswith("optim_states.pt") for name in listed)
    optim = next(name for name in listed if name.endswith("optim_states.pt"))
    damage(os.path.join(path, optim), 64)
    with pytest.raises(arguments.ArgumentError, match=f"{optim} does not match the SHA-256"):
        training.train(arguments.parse_args([*flags, "--train-iters", "3", "--load", str(tmp_path),
                                             "--override-opt_param-scheduler"]))
