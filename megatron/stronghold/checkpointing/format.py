"""What a checkpoint directory holds and how to find and read one (the layout is described in
checkpointing/__init__.py): names, the tracker file, the model's recorded flags, the RNG state,
per-parameter entries, and the reading of a checkpoint's files as data."""

import os
import random
import re

import numpy as np
import torch

from ..errors import ArgumentError, first_line
from .deepspeed_files import zero_weights
from stronghold_ext.remainders import join_master

from . import integrity

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
# Megatron-LM's tracker word and directory for a converted checkpoint (tools/convert_hf.py import):
# weights only, loaded as --finetune loads any checkpoint.
RELEASE = "release"
VERSION = 1
# The model's shape: a checkpoint loads only into a model with the same values.
SHAPE_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "max_position_embeddings", "padded_vocab_size", "untie_embeddings_and_output_weights",
              "num_query_groups", "kv_channels", "normalization", "swiglu", "openai_gelu", "disable_bias_linear",
              "add_qkv_bias", "qk_layernorm", "position_embedding_type")
# Recorded beside the shape, for tools that read a checkpoint (a converter), and free to change
# when training continues (a longer context with another rotary base, say).
RECORDED_ARGS = ("norm_epsilon", "rotary_base", "rotary_percent")
# What a checkpoint written before the layer flags existed holds: a GPT-2 layer.
_GPT2_LAYER = {"normalization": "LayerNorm", "swiglu": False, "openai_gelu": False, "disable_bias_linear": False,
               "add_qkv_bias": False, "qk_layernorm": False, "position_embedding_type": "learned_absolute"}
# Everything else that defines the model, saved with them as "args" so that a checkpoint
# can be turned into another framework's model (tools/convert_hf.py) without the command line that
# trained it: the tokenizer (its files by absolute path) and its vocabulary size before padding.
MODEL_ARGS = SHAPE_ARGS + RECORDED_ARGS + (
    "seq_length", "hidden_dropout", "attention_dropout", "make_vocab_size_divisible_by", "tokenizer_type",
    "tokenizer_model", "vocab_file", "merge_file", "vocab_size", "unpadded_vocab_size", "eod_token_id")
# How the optimizer keeps its state (recorded; a resume with other moment dtypes converts them).
OPTIMIZER_ARGS = ("store_param_remainders", "use_precision_aware_optimizer", "exp_avg_dtype", "exp_avg_sq_dtype",
                  "main_grads_dtype")
_ITERATION = re.compile(r"^iter_(\d{7})$")


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def iterations(root: str) -> list:
    """The iterations that have a checkpoint file in root, oldest first."""
    found = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _ITERATION.match(name)
        if m and os.path.isfile(os.path.join(root, name, FILE)):
            found.append(int(m.group(1)))
    return sorted(found)


def newest_intact(root: str, skip=None) -> str:
    """A sentence naming the newest checkpoint in root, other than iteration `skip`, whose files
    match their checksums, and how to resume from it."""
    for iteration in reversed(iterations(root)):
        if iteration == skip:
            continue
        try:
            verified = integrity.verify(iteration_dir(root, iteration))
        except integrity.Mismatch:
            continue
        how = "" if verified else " (written without checksums, so unverified)"
        return (f"The newest intact checkpoint is iteration {iteration}{how}: resume from it with "
                f"--load {root} --ckpt-step {iteration}")
    return f"No other checkpoint in {root} is intact"


def find_checkpoint(root: str, step: int | None = None):
    """(iteration, directory) of the checkpoint named by DIR's tracker file (iteration 0 for a
    release checkpoint), or of iteration `step` when given; None when DIR or the tracker does not
    exist; ValueError when the tracker is unreadable or names nothing complete."""
    tracker = os.path.join(root, TRACKER)
    if step is not None:
        iteration, path = step, iteration_dir(root, step)
        if not os.path.isfile(os.path.join(path, FILE)):
            raise ValueError(f"there is no checkpoint of iteration {step} ({os.path.join(path, FILE)} is missing)")
        return iteration, path
    if not os.path.isfile(tracker):
        return None
    try:
        with open(tracker) as f:
            text = f.read().strip()
        iteration = 0 if text == RELEASE else int(text)
    except (OSError, UnicodeDecodeError, ValueError):
        raise ValueError(f"{tracker} does not hold an iteration number (corrupt checkpoint directory)") from None
    path = os.path.join(root, RELEASE) if text == RELEASE else iteration_dir(root, iteration)
    if not os.path.isfile(os.path.join(path, FILE)):
        raise ValueError(f"{tracker} names {'the release checkpoint' if text == RELEASE else f'iteration {iteration}'}, "
                         f"but {os.path.join(path, FILE)} is missing")
    return iteration, path


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, log) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        saved = state.get("cuda") or []
        if len(saved) < torch.cuda.device_count():
            log(f"warning: the checkpoint has CUDA RNG states for {len(saved)} devices, this machine "
                f"has {torch.cuda.device_count()}: dropout masks will differ from an uninterrupted run")
        for device, s in enumerate(saved[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, device)


def shape_args(args, vocab_size: int) -> dict:
    values = {k: getattr(args, k) for k in SHAPE_ARGS if k != "padded_vocab_size"}
    values["padded_vocab_size"] = int(vocab_size)
    return values


def saved_shape(saved: dict) -> dict:
    """The shape a checkpoint's "args" describe, with the GPT-2 layer's values where it predates a flag."""
    values = {**_GPT2_LAYER, **saved}
    if "num_attention_heads" in saved:
        values.setdefault("num_query_groups", saved["num_attention_heads"])
        if "hidden_size" in saved:
            values.setdefault("kv_channels", saved["hidden_size"] // saved["num_attention_heads"])
    return values


def model_args(args, vocab) -> dict:
    """The "args" a checkpoint records: the Config's model flags and the tokenizer.Vocabulary."""
    values = {k: getattr(args, k) for k in MODEL_ARGS if hasattr(args, k)}
    values.update(padded_vocab_size=vocab.padded_size, unpadded_vocab_size=vocab.size, eod_token_id=vocab.eod)
    for k in ("tokenizer_model", "vocab_file", "merge_file"):
        if values[k]:
            values[k] = os.path.abspath(values[k])
    return values


def flag(name: str) -> str:
    return "padded vocabulary size" if name == "padded_vocab_size" else "--" + name.replace("_", "-")


def own_storage(t):
    """A tensor with the same memory whose storage is exactly its bytes (no copy), so torch.save
    writes this parameter only and not the whole flat buffer it is a view of."""
    if (t.device.type == "cpu" and t.is_contiguous()
            and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        flat = t.detach().reshape(-1)
        if t.dtype == torch.bfloat16:  # numpy has no bf16: its bits, viewed back
            return torch.from_numpy(flat.view(torch.int16).numpy()).view(torch.bfloat16).view(t.shape)
        return torch.from_numpy(flat.numpy()).view(t.shape)
    return t


def split_entries(entries: dict):
    """{name: {"param", "exp_avg", ...}} -> the ("model", "optimizer") entries of a checkpoint. A master
    stored as remainders stays so (its bf16 weight in "model", the remainder and ties beside the moments):
    writing it as fp32 would need 4 more bytes per parameter of host memory at every save."""
    model_sd, optimizer = {}, {}
    for key, entry in entries.items():
        model_sd[key] = own_storage(entry["param"])
        state = {k: own_storage(entry[k]) for k in ("exp_avg", "exp_avg_sq", "master_remainder", "master_ties")
                 if k in entry}
        if "exp_avg" in entry:
            state["step"] = int(entry["step"])
        if state:
            optimizer[key] = state
    return model_sd, optimizer


def part_file(rank: int) -> str:
    return f"streamed_layers_rank_{rank:03d}.pt"


def read_file(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, bit rot, a pickle with code in it, ...
        raise ArgumentError(f"cannot read checkpoint {path}: {first_line(exc)} (a corrupt or incomplete file, "
                            "or not a checkpoint of this trainer)") from None
    if not isinstance(state, dict) or "format" not in state or "iteration" not in state:
        raise ArgumentError(f"{path} is not a checkpoint of this trainer")
    return state


def read_checkpoint(path: str, iteration: int) -> dict:
    """The checkpoint in directory `path` (tensors memory-mapped, not read yet), data-parallel part
    files merged into its "model" and "optimizer" entries; ArgumentError when it is not a whole
    checkpoint of `iteration`."""
    state = read_file(os.path.join(path, FILE))
    if state["format"] not in ("deepspeed", "per-parameter"):
        raise ArgumentError(f"{path}: unknown checkpoint format {state['format']!r}")
    if state["iteration"] != iteration:
        raise ArgumentError(f"{path} holds iteration {state['iteration']}, its directory says {iteration}")
    for name in state.get("parts", []):  # streamed layers saved by other data-parallel ranks
        part = read_file(os.path.join(path, name))
        if part.get("format") != "per-parameter part" or part["iteration"] != iteration:
            raise ArgumentError(f"{os.path.join(path, name)} is not a part of the iteration-{iteration} checkpoint")
        state["model"].update(part["model"])
        state["optimizer"].update(part["optimizer"])
    state["path"] = path
    return state


def entry_master(entry: dict) -> torch.Tensor:
    """The fp32 master of a per-parameter entry: its "param", or, where the master was stored as the
    bf16 weight and a remainder (executor/host_store.py), the two joined, bit for bit."""
    if "master_remainder" in entry:
        return join_master(entry["param"], entry["master_remainder"], entry["master_ties"])
    return entry["param"]


def checkpoint_weights(state: dict) -> dict:
    """{GPTModel state_dict name: fp32 tensor} of a checkpoint read by read_checkpoint, whichever
    method wrote it (memory-mapped views, or the masters stored as remainders joined; megatron-core's
    `_extra_state` entries left out)."""
    if state["format"] == "deepspeed":
        return zero_weights(state["path"])
    optimizer = state.get("optimizer", {})
    return {k: entry_master({"param": v, **optimizer.get(k, {})}) for k, v in state["model"].items()
            if torch.is_tensor(v)}


def shape_mismatch(name: str, saved, here) -> str:
    """The one message for a tensor whose shape differs between a checkpoint and this model."""
    return f"{name}: shape {tuple(saved)} in the checkpoint, {tuple(here)} in this model"
