"""The run's configuration: parse_args builds one frozen Config from the flags, fills Megatron-LM's
derived defaults there, and touches nothing on disk (--save and --load are set up by the run)."""

import dataclasses

import pytest

from megatron.stronghold import arguments, training
from megatron.stronghold.config import Config

pytestmark = pytest.mark.unit

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "1", "--mock-data"]
DERIVED = {"world_size", "data_parallel_size", "data_parallel_rank", "num_microbatches", "params_dtype_name"}


def test_every_flag_has_a_typed_field_and_nothing_else_does():
    flags = {a.dest for a in arguments.build_parser()._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(Config)}
    assert fields - DERIVED == flags
    assert DERIVED <= fields


def test_the_config_is_frozen():
    args = arguments.parse_args(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        args.window_size = 4


def test_derived_values_are_computed_once_from_the_flags(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    args = arguments.parse_args([*TINY, "--global-batch-size", "32", "--tensor-model-parallel-size", "2",
                                 "--bf16", "--swiglu", "--hidden-size", "96", "--num-attention-heads", "6"])
    assert (args.world_size, args.data_parallel_size, args.data_parallel_rank) == (4, 2, 1)
    assert args.num_microbatches == 32 // (2 * 2)
    assert args.params_dtype_name == "bf16" and str(args.params_dtype) == "torch.bfloat16"
    assert args.ffn_hidden_size == 256  # Megatron-LM's SwiGLU width: 4 x 96 x 2/3 = 256, a multiple of 64
    assert args.kv_channels == 16 and args.num_query_groups == 6 and args.max_position_embeddings == 16
    assert args.lr_decay_iters == args.train_iters and args.exit_on_nonfinite_iters == 1


def test_parsing_touches_nothing_on_disk_and_the_run_checks_the_directories(tmp_path, capsys):
    save, load = tmp_path / "new" / "ckpt", tmp_path / "absent"
    args = arguments.parse_args([*TINY, "--save", str(save), "--load", str(load)])
    assert not save.exists() and args.load == str(load)  # parsed; no directory made, no tracker read
    assert training.main([*TINY, "--save", str(save), "--load", str(load)]) == 2
    assert "--load" in capsys.readouterr().err and save.is_dir()  # the run made --save before refusing --load
