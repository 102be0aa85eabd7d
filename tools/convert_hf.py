"""Hugging Face transformers models from this trainer's checkpoints, and back.

    python tools/convert_hf.py export --load CKPT_DIR --output HF_DIR [--tokenizer-model PATH] [--ckpt-step N]
    python tools/convert_hf.py import --hf HF_DIR --output CKPT_DIR

export reads the newest checkpoint in CKPT_DIR (or iteration N) written by any method and writes
HF_DIR/config.json, model.safetensors (shards above --max-shard-size) and the tokenizer's files,
which transformers.AutoModelForCausalLM.from_pretrained(HF_DIR) loads. import writes the weights of
a GPT-2, Llama, Qwen2 or Qwen3 model as CKPT_DIR/release (Megatron-LM's name for a converted
checkpoint) and prints the pretrain_gpt.py flags that build that model; `--load CKPT_DIR
--finetune` with them continues from it under any method. Neither needs a GPU; tensors are
converted one at a time from memory-mapped files (megatron/stronghold/hf_convert.py). Bad input
stops with `error: ...` and exit status 2; nothing in an existing directory is overwritten.
"""

import argparse
import os
import shlex
import shutil
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local directory only: nothing is downloaded

import torch  # noqa: E402

from megatron.stronghold import checkpointing  # noqa: E402
from megatron.stronghold import arguments  # noqa: E402
from megatron.stronghold.errors import ArgumentError, first_line  # noqa: E402
from megatron.stronghold.tokenizer import build_tokenizer  # noqa: E402
from megatron.stronghold.hf_convert import (  # noqa: E402
    ModelSpec, SafetensorsReader, Unsupported, copy_tokenizer, export_tensors, hf_architecture, hf_config,
    import_tensors, model_args_of, tokenizer_files, training_flags, vocab_divisor, write_safetensors, IMPORTABLE)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log(msg: str) -> None:
    print(f"convert_hf: {msg}", flush=True)


def _fresh_output(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise Unsupported(f"--output {path} exists and is not an empty directory: choose a new one "
                          "(nothing is overwritten)")


def _publish_dir(tmp: str, final: str) -> None:
    if os.path.isdir(final):
        os.rmdir(final)  # empty (checked before anything was written)
    os.replace(tmp, final)


def export(ns) -> None:
    _fresh_output(ns.output)
    try:
        found = checkpointing.find_checkpoint(ns.load, ns.ckpt_step)
    except ValueError as exc:
        raise Unsupported(f"--load {ns.load}: {exc}") from None
    if found is None:
        raise Unsupported(f"--load {ns.load}: no checkpoint there (no {checkpointing.TRACKER})")
    iteration, path = found
    try:  # the files against their checksums before any is read
        checkpointing.verify_checkpoint(path, iteration, ns.load, log)
    except ArgumentError as exc:
        raise Unsupported(str(exc)) from None
    state = checkpointing.read_checkpoint(path, iteration)
    spec, notes = ModelSpec.from_checkpoint(state)
    arch = hf_architecture(spec)
    tokenizer = tokenizer_files(ns.tokenizer_model, state.get("args", {}))
    weights = checkpointing.checkpoint_weights(state)
    for note in notes:
        log(f"note: {note}")
    dtype = DTYPES[ns.dtype]
    tmp = ns.output.rstrip("/") + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        hf_config(spec, arch, dtype).save_pretrained(tmp)
        files = write_safetensors(export_tensors(spec, arch, weights), tmp, dtype, int(ns.max_shard_size * 1e9))
        copy_tokenizer(tokenizer, tmp)
        _publish_dir(tmp, ns.output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dropped = spec.padded_vocab_size - spec.vocab_rows
    log(f"exported {path} (iteration {iteration}, written by {state.get('method')}) as {arch} to {ns.output}: "
        f"config.json, {', '.join(files)}" + (f", tokenizer ({', '.join(tokenizer)})" if tokenizer else
                                              ", no tokenizer files (none given or recorded)")
        + (f"; {spec.vocab_rows} vocabulary rows (the {dropped} padding rows left out)" if dropped else ""))


def _hf_tokenizer(hf_dir: str, kind: str):
    """(flags, vocabulary size) of the tokenizer in a transformers directory, or ([], None). The size
    is that of the tokenizer the flags build in training, so the printed divisor pads it exactly."""
    vocab, merges = os.path.join(hf_dir, "vocab.json"), os.path.join(hf_dir, "merges.txt")
    if kind == "gpt2" and os.path.isfile(vocab) and os.path.isfile(merges):
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
    elif any(os.path.isfile(os.path.join(hf_dir, n)) for n in ("tokenizer.json", "tokenizer_config.json")):
        flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf_dir]
    else:
        return [], None
    values = dict(tokenizer_type=None, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None)
    values.update({k.lstrip("-").replace("-", "_"): v for k, v in zip(flags[::2], flags[1::2])})
    try:
        return flags, build_tokenizer(argparse.Namespace(**values)).vocab_size
    except ValueError as exc:
        raise Unsupported(f"the tokenizer in {hf_dir} does not load for training: {exc}") from None


def _check_shapes(model: dict, args: dict, vocab: int, hf_dir: str) -> None:
    """Every imported tensor has the shape the trainer's model gives it for these flags (the model built
    on the meta device: no memory)."""
    from megatron.stronghold.distributed import init_distributed
    from megatron.stronghold.model import build_model

    init_distributed(torch.device("cpu"))  # megatron-core's parallel state, one process
    flags = arguments.parse_args(training_flags(args, 1, args["seq_length"]))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in build_model(flags, vocab).state_dict().items() if torch.is_tensor(v)}
    for name, tensor in model.items():
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise Unsupported(f"{hf_dir}: {name} has shape {tuple(tensor.shape)} in the weights, {expected[name]} for "
                              "the sizes config.json gives")


def import_(ns) -> None:
    import transformers

    _fresh_output(ns.output)
    if not os.path.isfile(os.path.join(ns.hf, "config.json")):
        raise Unsupported(f"--hf {ns.hf}: no config.json there (a directory written by save_pretrained)")
    try:
        config = transformers.AutoConfig.from_pretrained(ns.hf)
        args = model_args_of(config)
    except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:  # not JSON, a field missing
        raise Unsupported(f"{os.path.join(ns.hf, 'config.json')} cannot be read as a transformers config: "
                          f"{first_line(exc)}") from None
    kind = config.model_type
    vocab = args["padded_vocab_size"]
    hf_dir = os.path.abspath(ns.hf)
    tokenizer_flags, tokens = _hf_tokenizer(hf_dir, kind)
    if tokens is not None and tokens > vocab:
        raise Unsupported(f"the tokenizer in {ns.hf} has {tokens} ids, the model's embedding {vocab} rows")
    divisor = vocab_divisor(vocab, tokens)
    seq_length = min(args["max_position_embeddings"], 4096)
    args.update(seq_length=seq_length, make_vocab_size_divisible_by=divisor, unpadded_vocab_size=tokens or vocab,
                eod_token_id=config.eos_token_id if isinstance(config.eos_token_id, int) else None)
    if tokenizer_flags:
        args.update({k.lstrip("-").replace("-", "_"): v for k, v in zip(tokenizer_flags[::2], tokenizer_flags[1::2])})
    spec = ModelSpec(vocab_rows=vocab, **{k: v for k, v in args.items() if k in ModelSpec.__dataclass_fields__})
    reader = SafetensorsReader(ns.hf)
    try:
        model = dict(import_tensors(spec, kind, reader))  # one copy of the model, in fp32
    except RuntimeError as exc:  # a tensor of another size than config.json gives (fused or stacked)
        raise Unsupported(f"the weights in {ns.hf} do not have the sizes config.json gives: {first_line(exc)}") from None
    left = [n for n in reader.unused() if not (n == "lm_head.weight" and not spec.untie_embeddings_and_output_weights)]
    if left:
        raise Unsupported(f"the weights in {ns.hf} hold {len(left)} tensors that config.json does not describe "
                          f"(e.g. {left[0]}): its layer count or layout disagrees with them")
    _check_shapes(model, args, vocab, ns.hf)
    rows = model["embedding.word_embeddings.weight"].shape[0]
    if rows != vocab:
        raise Unsupported(f"the embedding has {rows} rows, config.json's vocab_size is {vocab}")
    state = {"method": f"tools/convert_hf.py import of {IMPORTABLE[kind]}", "source": hf_dir,
             "args": {k: args.get(k) for k in checkpointing.MODEL_ARGS}, "model": model}
    path = checkpointing.save_release(ns.output, state)
    total = sum(t.numel() for t in model.values())
    log(f"imported {IMPORTABLE[kind]} from {ns.hf} ({total} parameters) into {path}")
    if not tokenizer_flags:
        log(f"note: {ns.hf} has no tokenizer files: add your tokenizer's flags; its vocabulary must pad to "
            f"{vocab} ids with --make-vocab-size-divisible-by {divisor}")
    log("train from it with these pretrain_gpt.py flags (after `examples/run.sh -m METHOD --`):")
    flags = ["--load", os.path.abspath(ns.output), "--finetune",
             *training_flags(args, divisor, seq_length), *tokenizer_flags]
    print(shlex.join(flags), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/convert_hf.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="checkpoint -> Hugging Face model directory")
    e.add_argument("--load", required=True, metavar="CKPT_DIR", help="A --save directory of pretrain_gpt.py.")
    e.add_argument("--output", required=True, metavar="HF_DIR", help="A new (or empty) directory.")
    e.add_argument("--tokenizer-model", default=None, metavar="PATH",
                   help="A tokenizer directory or tokenizer.json to copy (default: the files the checkpoint's "
                   "tokenizer flags name, if any).")
    e.add_argument("--ckpt-step", type=int, default=None, metavar="N",
                   help="Export iteration N instead of the newest checkpoint.")
    e.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="Data type of the written weights (the checkpoint's are fp32).")
    e.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="Largest model.safetensors file; larger models are written as shards with an index.")
    i = sub.add_parser("import", help="Hugging Face model directory -> checkpoint for --load ... --finetune")
    i.add_argument("--hf", required=True, metavar="HF_DIR", help="A local directory written by save_pretrained.")
    i.add_argument("--output", required=True, metavar="CKPT_DIR", help="A new (or empty) directory.")
    return p


def main(argv=None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        if ns.command == "export":
            if ns.max_shard_size <= 0:
                raise Unsupported("--max-shard-size must be positive")
            export(ns)
        else:
            import_(ns)
    except (Unsupported, ArgumentError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
