"""Llama-style layers through Megatron-LM's flags: RMSNorm, SwiGLU, rotary embeddings, grouped-query
attention, no biases, untied output layer. Every method trains them exactly like megatron-lm (fp32,
1e-5), and the planner's byte counts and the FLOPs follow the layer the flags build."""

import functools
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron.stronghold import arguments, distributed, training
from megatron.stronghold.logs import read_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_SH = os.path.join(ROOT, "examples", "run.sh")
RTOL = 1e-5
NORM_RTOL = 2e-5  # a norm amplifies the weights' rounding differences (test_zero_baselines.py)
ITERS = 6

LLAMA = ["--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu", "--position-embedding-type", "rope",
         "--rotary-base", "500000", "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights"]
# Three micro-batches per step, dropout on (the default 0.1): the layer-major order must draw
# megatron-lm's masks.
TINY = ["--num-attention-heads", "4", "--seq-length", "16", "--global-batch-size", "6", "--train-iters", str(ITERS),
        "--lr", "3e-3", "--log-interval", "1", *LLAMA]


def tiny_args(*extra, layers=3, hidden=32):
    return arguments.parse_args(["--num-layers", str(layers), "--hidden-size", str(hidden), "--micro-batch-size", "2",
                                 *TINY, *extra])


def launch(tmp_path, method, *extra):
    """examples/run.sh on the tiny Llama-style model; its log."""
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / method))
    result = subprocess.run(["bash", RUN_SH, "-m", method, "-l", "3", "-h", "32", "-b", "2", "-w", "2", "--", *TINY,
                             *extra], env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (log,) = (tmp_path / method).iterdir()
    return read_log(log), log.read_text()


@pytest.mark.integration
def test_stronghold_streams_a_llama_model_like_megatron_through_the_launcher(tmp_path):
    from megatron.stronghold.planner import ModelCosts

    reference, _ = launch(tmp_path, "megatron-lm")
    streamed, text = launch(tmp_path, "stronghold", "--resident-layers", "0")
    assert len(streamed.iterations) == len(reference.iterations) == ITERS
    assert streamed.series("lm loss") == pytest.approx(reference.series("lm loss"), rel=RTOL)
    assert streamed.series("grad norm") == pytest.approx(reference.series("grad norm"), rel=NORM_RTOL)
    assert reference.series("lm loss")[-1] < reference.series("lm loss")[0]  # it trains
    # The planner's counts are the model's: the host store holds its three layers' parameters.
    costs = ModelCosts.of(tiny_args(), 384)  # ByteTokenizer's vocabulary, padded to 128
    assert streamed.total_parameters == reference.total_parameters == 3 * costs.layer_params + costs.other_params
    assert f"host store: 3 of 3 streamed layers on this rank, {3 * costs.layer_params} parameters" in text
    assert "= 16.00 B/param" in text


@functools.lru_cache(maxsize=None)
def train(method, extra=()):
    return training.train(tiny_args("--offload-method", method, "--window-size", "2", *extra))


@pytest.mark.parametrize("method,extra", [
    ("l2l", ()),
    ("stronghold", ("--resident-layers", "1", "--qk-layernorm", "--kv-channels", "16", "--rotary-percent", "0.5")),
    ("zero-offload", ()),
    ("zero-infinity", ()),
])
@pytest.mark.integration
def test_every_method_trains_a_llama_model_like_megatron(method, extra):
    reference, got = train("megatron-lm", extra), train(method, extra)
    assert got.losses == pytest.approx(reference.losses, rel=RTOL)
    assert got.grad_norms == pytest.approx(reference.grad_norms, rel=NORM_RTOL)


@pytest.mark.parametrize("flags", [
    LLAMA,
    [*LLAMA, "--qk-layernorm", "--kv-channels", "12", "--add-qkv-bias"],
    ["--swiglu", "--qk-layernorm"],  # LayerNorm: norms with biases
    [],  # GPT-2's layer
])
@pytest.mark.unit
def test_the_planners_counts_are_the_built_layers_parameters(flags):
    from megatron.stronghold.model import build_model
    from megatron.stronghold.planner import ModelCosts

    args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "48", "--num-attention-heads", "4",
                                 "--ffn-hidden-size", "80", "--seq-length", "16", *flags])
    distributed.init_distributed(torch.device("cpu"))
    model = build_model(args, 256)
    costs = ModelCosts.of(args, 256)
    layer = model.decoder.layers[0]
    assert costs.layer_params == sum(p.numel() for p in layer.parameters())
    assert costs.layers * costs.layer_params + costs.other_params == sum(p.numel() for p in model.parameters())
    if "--swiglu" in flags:  # the first MLP matrix is 2 x ffn wide
        assert tuple(layer.mlp.linear_fc1.weight.shape) == (160, 48)
    if "--disable-bias-linear" in flags and "--add-qkv-bias" not in flags:
        assert not [n for n, _ in layer.named_parameters() if n.endswith("bias")]


@pytest.mark.unit
def test_flops_follow_grouped_query_attention_and_swiglu():
    from megatron.stronghold.model import flops_per_iteration

    args = arguments.parse_args(["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
                                 "--group-query-attention", "--num-query-groups", "2", "--swiglu",
                                 "--ffn-hidden-size", "96", "--seq-length", "8", "--micro-batch-size", "2",
                                 "--disable-bias-linear", "--position-embedding-type", "rope"])
    tokens, vocab = 2 * 8, 128
    # Per token and layer, 2 FLOPs per weight: query 64x64, keys and values 2 x 64x32 (2 groups of
    # 16 channels), output 64x64, SwiGLU 64x192 and 96x64; scores and their product with the
    # values: 2 x 2 x 8 positions x 64 query channels.
    per_token = 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 64 * 192 + 96 * 64) + 2 * 2 * 8 * 64
    forward = 2 * tokens * per_token + 2 * tokens * 64 * vocab  # + the output layer
    assert flops_per_iteration(args, vocab) == 3 * forward == 6_881_280
    # Megatron-LM's closed form: 12 b s L h^2 ((1 + g/n + s/h) + 3/2 f/h + V / (2 L h)).
    assert 3 * forward == 12 * tokens * 2 * 64 ** 2 * ((1 + 2 / 4 + 8 / 64) + 1.5 * 96 / 64 + vocab / (2 * 2 * 64))


@pytest.mark.unit
def test_the_final_norm_is_torchs_where_apex_or_transformer_engine_would_be_picked(monkeypatch):
    """Where apex (or TransformerEngine) is installed megatron-core's block takes its norm for the
    final one, and apex's FusedLayerNorm has no RMSNorm: every norm must be torch's whatever is
    installed (stood in for here by a norm that refuses to be built)."""
    from megatron.core.models import backends
    from megatron.core.transformer import transformer_block

    from megatron.stronghold.model import build_model

    class InstalledNorm(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the model took the installed norm")

    monkeypatch.setattr(transformer_block, "LayerNormImpl", InstalledNorm)
    monkeypatch.setattr(backends, "LNImpl", InstalledNorm)
    distributed.init_distributed(torch.device("cpu"))
    for flags, norm in ((LLAMA, torch.nn.RMSNorm), ([], torch.nn.LayerNorm)):
        args = arguments.parse_args(["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
                                     "--seq-length", "16", *flags])
        model = build_model(args, 256)
        assert type(model.decoder.final_layernorm) is norm
        assert type(model.decoder.layers[0].input_layernorm) is norm


@pytest.mark.parametrize("flags,message", [
    (["--group-query-attention", "--num-query-groups", "3"], "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (["--position-embedding-type", "rope", "--rotary-percent", "0"], r"--rotary-percent must be in \(0, 1\], got 0.0"),
    (["--position-embedding-type", "rope", "--rotary-percent", "1.5"], r"--rotary-percent must be in \(0, 1\]"),
    (["--position-embedding-type", "rope", "--rotary-percent", "0.375"], "rotates 3 channels per head"),
    (["--kv-channels", "0"], "--kv-channels must be a positive integer"),
    (["--swiglu", "--hidden-size", "16"], "--swiglu with --hidden-size 16 gives an MLP of 0 channels"),
    (["--normalization", "RMSNorm", "--norm-epsilon", "0"], "--norm-epsilon must be > 0"),
])
@pytest.mark.unit
def test_bad_layer_flags_stop_with_a_message(capsys, flags, message):
    argv = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", *flags]
    assert training.main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.integration
def test_bad_layer_flags_stop_the_launcher(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path))
    result = subprocess.run(["bash", RUN_SH, "-m", "stronghold", "-l", "2", "-h", "32", "--", "--num-attention-heads", "4",
                             "--group-query-attention", "--num-query-groups", "3"], env=env, cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "error: --num-attention-heads 4 is not divisible by --num-query-groups 3" in output
    assert "Traceback" not in output


@pytest.mark.integration
def test_a_gpt_checkpoint_does_not_load_into_a_llama_model(tmp_path, capsys):
    base = ["--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "2", "--train-iters", "1", "--mock-data"]
    assert training.main([*base, "--save", str(tmp_path)]) == 0
    assert training.main([*base, "--train-iters", "2", "--load", str(tmp_path), *LLAMA]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "--normalization LayerNorm in the checkpoint, RMSNorm here" in err
