"""tools/convert_hf.py and --finetune: checkpoints of every method become transformers models that
compute the same logits, transformers models become checkpoints whose first training loss is
transformers' loss, and anything transformers has no class for is refused.

Tiny fp32 models on the CPU; transformers models are made here from their config classes (nothing
is downloaded).
"""

import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
if os.access(sys.prefix, os.W_OK):  # DeepSpeed's CPU Adam is built once, as in test_zero_baselines.py
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from megatron.stronghold import arguments, checkpointing, distributed, training  # noqa: E402
from megatron.stronghold.logs import parse_log  # noqa: E402
from megatron.stronghold.model import build_model  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import convert_hf  # noqa: E402

pytestmark = pytest.mark.integration

SHAPE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16"]
# lr 1e-2: a few steps move the weights well away from their initialisation
TRAIN = ["--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-2", "--lr-warmup-iters", "0", "--mock-data"]
LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--rotary-base", "5000",
         "--norm-epsilon", "1e-6", "--ffn-hidden-size", "48"]
LAYERS = {  # flags -> the transformers class they export as
    "gpt": ([], "GPT2LMHeadModel"),
    "gpt-untied-openai-gelu": (["--untie-embeddings-and-output-weights", "--openai-gelu"], "GPT2LMHeadModel"),
    "llama-gqa-untied": ([*LLAMA, "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
                          "--untie-embeddings-and-output-weights"], "LlamaForCausalLM"),
    "llama-biases-kv-channels": ([*LLAMA, "--kv-channels", "16"], "LlamaForCausalLM"),
    "qwen2": ([*LLAMA, "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear",
               "--add-qkv-bias"], "Qwen2ForCausalLM"),
    "qwen3": ([*LLAMA, "--qk-layernorm", "--disable-bias-linear", "--kv-channels", "16"], "Qwen3ForCausalLM"),
}


def train(*flags):
    history = training.train(arguments.parse_args([*SHAPE, *TRAIN, *flags]))
    assert history.exit_code == 0
    return history


def export(*argv):
    assert convert_hf.main(["export", *argv]) == 0


def our_logits(flags, weights, tokens):
    """Logits of the megatron-core GPT the trainer builds for `flags`, holding `weights`."""
    args = arguments.parse_args([*SHAPE, *flags])
    distributed.init_distributed(torch.device("cpu"))
    vocab = weights["embedding.word_embeddings.weight"].shape[0]
    model = build_model(args, vocab)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing)
    model.eval()
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions, None)


def hf_logits(hf_dir, tokens, architecture):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == architecture
    with torch.no_grad():
        return model(tokens).logits


def assert_same_logits(ours, theirs, rows):
    """transformers' logits equal ours on the exported (real) vocabulary rows, fp32 to 1e-4."""
    assert theirs.shape[-1] == rows and ours.shape[-1] >= rows
    ours = ours[..., :rows]
    scale = float(ours.abs().max())
    assert scale > 0.1  # trained weights, not an all-zero output
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4 * scale)


def tokens_of(vocab):
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))


def checkpoint_state(root):
    iteration, path = checkpointing.find_checkpoint(root)
    return checkpointing.read_checkpoint(path, iteration)


@pytest.mark.parametrize("layer", list(LAYERS))
def test_export_computes_our_logits(tmp_path, layer):
    flags, architecture = LAYERS[layer]
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    train(*flags, "--save", ckpt)
    export("--load", ckpt, "--output", hf)
    weights = checkpointing.checkpoint_weights(checkpoint_state(ckpt))
    tokens = tokens_of(257)  # ByteTokenizer: 257 ids, padded to 384 rows in training
    assert_same_logits(our_logits(flags, weights, tokens), hf_logits(hf, tokens, architecture), rows=257)
    files = sorted(os.listdir(hf))
    assert files == ["config.json", "model.safetensors"]


def test_export_of_a_data_parallel_stronghold_checkpoint(tmp_path):
    """Two processes, every layer streamed: rank 1 writes the layer it owns into a part file, which
    the export merges; the transformers model computes the checkpoint's logits."""
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(ROOT, "pretrain_gpt.py"), *SHAPE, *TRAIN, "--global-batch-size", "4",
           "--offload-method", "stronghold", "--resident-layers", "0", "--window-size", "1", "--save", ckpt]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "streamed_layers_rank_001.pt" in os.listdir(os.path.join(ckpt, "iter_0000003"))
    export("--load", ckpt, "--output", hf)
    state = checkpoint_state(ckpt)
    main_file = torch.load(os.path.join(state["path"], checkpointing.FILE), weights_only=True, mmap=True)
    assert not any(k.startswith("decoder.layers.1.") and torch.is_tensor(v)
                   for k, v in main_file["model"].items())  # layer 1 is in rank 1's part only
    tokens = tokens_of(257)
    ours = our_logits([], checkpointing.checkpoint_weights(state), tokens)
    assert_same_logits(ours, hf_logits(hf, tokens, "GPT2LMHeadModel"), rows=257)


@pytest.mark.parametrize("method", ["zero-offload", "zero-infinity"])
def test_export_of_a_zero_checkpoint(tmp_path, method):
    """DeepSpeed's partitioned files, read as plain data; the reference weights come from DeepSpeed's
    own consolidation (zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    flags = [*LLAMA, "--group-query-attention", "--num-query-groups", "2", "--disable-bias-linear"]
    train(*flags, "--offload-method", method, "--save", ckpt)
    export("--load", ckpt, "--output", hf)
    reference = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="iter_0000003")
    tokens = tokens_of(257)
    assert_same_logits(our_logits(flags, reference, tokens), hf_logits(hf, tokens, "LlamaForCausalLM"), rows=257)


def test_export_copies_the_tokenizer_and_picks_a_step(tmp_path):
    """--tokenizer-model copies a tokenizer.json that AutoTokenizer then reads; --ckpt-step exports
    an older iteration than the newest."""
    import tokenizers
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    train("--save", ckpt, "--save-interval", "2")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the quick brown fox", "jumps over the lazy dog"] * 10,
                            tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    export("--load", ckpt, "--output", hf, "--ckpt-step", "2", "--tokenizer-model", str(tmp_path / "tokenizer.json"))
    loaded = transformers.AutoTokenizer.from_pretrained(hf)
    assert loaded("the lazy fox")["input_ids"] == tok.encode("the lazy fox").ids
    tokens = tokens_of(257)
    state = checkpointing.read_checkpoint(checkpointing.iteration_dir(ckpt, 2), 2)
    ours = our_logits([], checkpointing.checkpoint_weights(state), tokens)
    assert_same_logits(ours, hf_logits(hf, tokens, "GPT2LMHeadModel"), rows=257)


def test_gpt2_bpe_tokenizer_travels_both_ways(tmp_path, capsys):
    """A model trained with GPT2BPETokenizer exports with its vocab.json/merges.txt (transformers'
    GPT-2 tokenizer then gives the same ids); importing that directory prints GPT2BPETokenizer flags
    whose padded vocabulary is the exported one, and fine-tuning with them loads the weights."""
    import tokenizers
    from megatron.stronghold.tokenizer import build_tokenizer

    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(tmp_path))
    vocab, merges = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    ckpt, hf, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    tokenizer = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
    train(*tokenizer, "--save", ckpt)
    export("--load", ckpt, "--output", hf)
    assert {"vocab.json", "merges.txt"} <= set(os.listdir(hf))
    ours = build_tokenizer(arguments.parse_args([*SHAPE, *tokenizer]))
    text = "the lazy brown dog"
    assert transformers.AutoTokenizer.from_pretrained(hf)(text)["input_ids"] == ours.tokenize(text)
    rows = transformers.AutoConfig.from_pretrained(hf).vocab_size
    assert rows == ours.vocab_size

    capsys.readouterr()
    assert convert_hf.main(["import", "--hf", hf, "--output", back]) == 0
    flags = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert flags[-6:] == ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(hf, "vocab.json"),
                          "--merge-file", os.path.join(hf, "merges.txt")]
    history = train(*flags, "--seq-length", "16", "--train-iters", "1")
    assert len(history.losses) == 1


# ----- import -----

def tiny_hf_model(kind, out):
    """A random transformers model; weights larger than the default initialisation, so that GELU's
    exact and tanh forms give losses that differ beyond the test's tolerance."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=300, n_positions=32,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3,
                                         bos_token_id=299, eos_token_id=299)  # gelu_new: OpenAI's tanh GELU
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=300, max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
            rms_norm_eps=1e-5, initializer_range=0.3, bos_token_id=299, eos_token_id=299, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out)
    return model.eval()


def hf_loss(model, batch):
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    return float((losses * mask).sum() / mask.sum())


def first_batch(flags):
    from megatron.stronghold.data import build_data_iterators
    from megatron.stronghold.tokenizer import build_tokenizer

    args = arguments.parse_args(flags)
    distributed.init_distributed(torch.device("cpu"))
    return next(build_data_iterators(args, build_tokenizer(args))[0])


@pytest.mark.parametrize("kind,method", [("gpt2", "megatron-lm"), ("llama", "stronghold")])
def test_import_then_finetune_starts_at_transformers_loss(tmp_path, capsys, kind, method):
    """Import prints the flags; examples/run.sh with them and --load --finetune logs, at iteration 1,
    transformers' loss on the same batch (the 300-id vocabulary is the NullTokenizer's 299 + eod)."""
    hf, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    model = tiny_hf_model(kind, hf)
    assert convert_hf.main(["import", "--hf", hf, "--output", ckpt]) == 0
    flags = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert flags[:3] == ["--load", os.path.abspath(ckpt), "--finetune"]
    assert ("--openai-gelu" in flags) == (kind == "gpt2")
    assert ("--group-query-attention" in flags) == (kind == "llama")
    flags += ["--tokenizer-type", "NullTokenizer", "--vocab-size", "299", "--seq-length", "16",
              "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "1"]
    if method == "stronghold":
        flags += ["--resident-layers", "0"]  # every layer streamed
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run.sh"), "-m", method, "--", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "for fine-tuning" in proc.stdout
    first = parse_log(proc.stdout).iterations[0]
    assert first["iteration"] == 1
    ours = first["lm loss"]
    reference = hf_loss(model, first_batch(flags))
    assert ours == pytest.approx(reference, rel=1e-5)


def test_import_with_a_hugging_face_tokenizer_trains_on_its_tokens(tmp_path, capsys):
    """A Llama with its own BPE tokenizer (301 ids: 300 trained and an added pad token) in one
    directory: import prints HuggingFaceTokenizer flags for it, preprocess_data.py tokenizes a corpus
    with that directory, and examples/run.sh with the printed flags pads the vocabulary to exactly
    the model's 301 rows and logs, at iteration 1, transformers' loss on the same batch."""
    import tokenizers
    import preprocess_data
    from test_tokenizers import EOD, _docstrings, _write_jsonl

    hf, ckpt, prefix = str(tmp_path / "hf"), str(tmp_path / "ckpt"), str(tmp_path / "corpus")
    texts = _docstrings()
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator(texts, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOD], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOD, pad_token="<pad>")
    vocab = len(tokenizer)
    assert vocab == 301 and tokenizer.pad_token_id == 300  # not a multiple of 128: padding would add rows
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab, max_position_embeddings=32, rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
        initializer_range=0.3, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)

    assert convert_hf.main(["import", "--hf", hf, "--output", ckpt]) == 0
    flags = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert flags[-4:] == ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", os.path.abspath(hf)]
    assert flags[:3] == ["--load", os.path.abspath(ckpt), "--finetune"]

    _write_jsonl(tmp_path / "corpus.jsonl", texts[:40])
    assert preprocess_data.main(["--input", str(tmp_path / "corpus.jsonl"), "--json-keys", "text", "--output-prefix",
                                 prefix, *flags[-4:], "--append-eod"]) == 0
    flags += ["--data-path", prefix + "_text_document", "--data-cache-path", str(tmp_path / "cache"),
              "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "1"]
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run.sh"), "-m", "stronghold", "--", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "> building HuggingFaceTokenizer tokenizer" in proc.stdout
    assert f"> padded vocab (size: {vocab}) with 0 dummy tokens (new size: {vocab})" in proc.stdout
    assert "for fine-tuning" in proc.stdout
    first = parse_log(proc.stdout).iterations[0]
    assert first["iteration"] == 1
    batch = first_batch(flags)
    assert int(batch["tokens"].max()) > 255  # the corpus in the BPE's ids, not mock data or bytes
    assert first["lm loss"] == pytest.approx(hf_loss(model, batch), rel=1e-5)


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_a_hugging_face_llama_fine_tunes_from_transformers_loss(tmp_path, capsys, packing):
    """A tiny Llama with the chat tokenizer in one directory, imported, then `examples/run.sh -m stronghold
    -- --sft` on a file repeating one conversation, packed two to a sequence: iteration 1 logs
    transformers' loss on that conversation alone with labels -100 outside the template's generation
    mask (fp32, 1e-4), so packing leaks no attention."""
    from test_sft import CHAT, TEMPLATE, tokenizer_dir, write_jsonl

    hf, ckpt = tmp_path / "hf", str(tmp_path / "ckpt")
    tokenizer_dir(hf, TEMPLATE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf))
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tokenizer), max_position_embeddings=64, initializer_range=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(str(hf))

    assert convert_hf.main(["import", "--hf", str(hf), "--output", ckpt]) == 0
    flags = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 4)
    flags += ["--sft", "--data-path", data, "--split", "1,0,0", "--seq-length", "48", "--micro-batch-size", "2",
              "--global-batch-size", "2", "--train-iters", "2", "--log-interval", "1", "--resident-layers", "0"]
    flags += [] if packing == "packed" else ["--no-sft-packing"]
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "results"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run.sh"), "-m", "stronghold", "--", *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "for fine-tuning" in proc.stdout and "> sft train: 4 conversations" in proc.stdout
    assert ("> sft train: 2 sequences of 49 tokens (packed)" if packing == "packed"
            else "> sft train: 4 sequences of 49 tokens (one conversation each)") in proc.stdout

    rendered = tokenizer.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.tensor([rendered["input_ids"]])
    labels = ids.clone()
    labels[0, torch.tensor(rendered["assistant_masks"]) == 0] = -100
    with torch.no_grad():
        reference = float(model(ids, labels=labels).loss)  # transformers shifts the labels itself
    assert parse_log(proc.stdout).iterations[0]["lm loss"] == pytest.approx(reference, rel=1e-4)


@pytest.mark.parametrize("method", ["megatron-lm", "stronghold", "l2l", "zero-offload", "zero-infinity"])
def test_finetune_takes_the_weights_only(tmp_path, method):
    """A checkpoint of iteration 3 (with Adam moments and a schedule) and the same weights exported
    and imported again (weights only): fine-tuning from either trains identically under any method,
    from iteration 1 with a fresh schedule, and from those weights (not a fresh initialisation)."""
    ckpt, hf, back = str(tmp_path / "ckpt"), str(tmp_path / "hf"), str(tmp_path / "back")
    exact_vocab = ("--make-vocab-size-divisible-by", "1")  # 257 rows: the export keeps them all
    train(*exact_vocab, "--save", ckpt, "--lr-warmup-iters", "1", "--train-iters", "3")
    export("--load", ckpt, "--output", hf)
    assert convert_hf.main(["import", "--hf", hf, "--output", back]) == 0
    extra = ["--resident-layers", "1", "--window-size", "1"] if method == "stronghold" else []
    run = [*exact_vocab, "--offload-method", method, "--lr-warmup-iters", "2", *extra]
    fresh = train(*run)
    from_checkpoint = train(*run, "--load", ckpt, "--finetune")
    from_release = train(*run, "--load", back)  # a release checkpoint: --finetune is assumed
    assert len(from_checkpoint.losses) == len(from_release.losses) == 3
    assert from_checkpoint.lrs == fresh.lrs
    assert from_checkpoint.losses == pytest.approx(from_release.losses, rel=1e-5)
    assert from_checkpoint.grad_norms == pytest.approx(from_release.grad_norms, rel=1e-5)
    assert abs(from_checkpoint.losses[0] - fresh.losses[0]) > 1e-3


# ----- refusals -----

def test_unsupported_models_are_refused_with_exit_2(tmp_path, capsys):
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    train("--normalization", "RMSNorm", "--train-iters", "1", "--save", ckpt)  # RMSNorm, learned positions
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_hf.py"), "export", "--load", ckpt,
                           "--output", hf], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.search(r"error: cannot export .*GPT2LMHeadModel.*needs LayerNorm", proc.stderr)
    assert "Traceback" not in proc.stderr and not os.path.exists(hf)

    neox = str(tmp_path / "neox")
    transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4,
                               intermediate_size=64).save_pretrained(neox)
    assert convert_hf.main(["import", "--hf", neox, "--output", str(tmp_path / "out")]) == 2
    assert not os.path.exists(tmp_path / "out")

    # a tokenizer that training would refuse (no eos_token) is refused at import, not after it
    import tokenizers
    llama = str(tmp_path / "llama")
    tiny_hf_model("llama", llama)
    bare = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    transformers.PreTrainedTokenizerFast(tokenizer_object=bare).save_pretrained(llama)
    assert convert_hf.main(["import", "--hf", llama, "--output", str(tmp_path / "out")]) == 2
    assert "names no end-of-document token" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def _edit_config(hf, **changes):
    import json

    path = os.path.join(hf, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage,message", [
    (lambda hf: open(os.path.join(hf, "config.json"), "w").write("{not json"), "cannot be read as a transformers config"),
    (lambda hf: _edit_config(hf, num_hidden_layers=1), "hold 9 tensors that config.json does not describe"),
    (lambda hf: _edit_config(hf, intermediate_size=64),
     "linear_fc1.weight has shape (96, 32) in the weights, (128, 32) for the sizes config.json gives"),
    (lambda hf: _edit_config(hf, num_key_value_heads=4), "do not have the sizes config.json gives"),
    (lambda hf: _truncate(os.path.join(hf, "model.safetensors")), "(a damaged or incomplete file)"),
], ids=["config-not-json", "fewer-layers", "other-ffn", "other-kv-heads", "truncated-weights"])
def test_import_of_a_bad_directory_is_refused_with_one_line(tmp_path, capsys, damage, message):
    hf, ckpt = str(tmp_path / "hf"), str(tmp_path / "ckpt")
    tiny_hf_model("llama", hf)
    damage(hf)
    capsys.readouterr()  # transformers' own progress lines while saving
    assert convert_hf.main(["import", "--hf", hf, "--output", ckpt]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err, err
    assert not os.path.exists(os.path.join(ckpt, "release"))
