"""Checkpoints for every method, and the rules that end a run safely.

Layout (Megatron-LM's names, one process):

    DIR/latest_checkpointed_iteration.txt   the iteration of the newest complete checkpoint
    DIR/iter_0000010/model_optim_rng.pt     model, optimizer, schedule, loss scale, RNG, progress

Megatron-LM puts the file one level deeper (`iter_0000010/mp_rank_00/`) for its tensor-parallel ranks;
this trainer has none, so the file sits in the iteration directory. With data parallelism each
streamed layer lives on one rank only (executor/streaming.py): rank r > 0 writes the layers it owns
into DIR/iter_0000010/streamed_layers_rank_00r.pt ("model" and "optimizer" entries as below), the
main file lists those parts under "parts", and loading merges them (memory-mapped) before anything
else, so the checkpoint reads as one at any data-parallel size and in any method.

What a checkpoint holds does not depend on the method that wrote it (format "per-parameter"):
- "model": megatron-core GPTModel.state_dict() keys (`decoder.layers.N....`), fp32 values taken from
  the fp32 master weights (the compute-dtype copies are derived from them on load);
- "optimizer": per parameter name, AdamW's `exp_avg`, `exp_avg_sq` (fp32) and `step` (int);
- "opt_param_scheduler" (megatron-core OptimizerParamScheduler.state_dict()), "loss_scaler",
  "iteration", "consumed_train_samples", "consumed_valid_samples", "rng_state" (python, numpy,
  torch CPU, CUDA when present) and "args": the model's flags (MODEL_ARGS: its shape, to refuse a
  mismatch up front, and everything tools/convert_hf.py needs to rebuild it elsewhere, the
  tokenizer and its vocabulary size before padding included);
- "stronghold_guess_next_step" (stronghold and l2l only): whether the executor's next iteration may
  step layers before the global norm is known, so a resumed run guesses (and rounds) as the
  uninterrupted one would; other methods ignore it.
So a checkpoint written by stronghold loads into megatron-lm or l2l and the other way round, at any
--resident-layers / --window-size, in any precision. StrongHold and L2L write their streamed layers
straight from the host store: the tensors handed to torch.save alias the fp32 masters and Adam
moments, so nothing is staged on the GPU or copied in host memory.

ZeRO (zero-offload, zero-infinity) saves through DeepSpeed's own engine.save_checkpoint into the
same DIR/iter_XXXXXXX/ (DeepSpeed's partitioned files), beside a model_optim_rng.pt that holds the
trainer's part only (format "deepspeed"). Such a checkpoint loads only into a run of the same ZeRO
method, through engine.load_checkpoint; the other methods refuse it, and ZeRO runs refuse
per-parameter checkpoints.

--finetune (Megatron-LM's flag) takes only the weights of any of these checkpoints, into any method,
and the run starts at iteration 0 with a fresh optimizer, schedule, loss scale and data position.
A checkpoint converted from elsewhere (tools/convert_hf.py import) holds weights only and sits in
DIR/release with the tracker saying "release", Megatron-LM's names; it always loads that way.

Safety:
- a checkpoint is data: it is read with torch.load(weights_only=True), which cannot run code.
  DeepSpeed's loader unpickles (weights_only=False), so its files are first read with
  weights_only=True as well and refused if that fails;
- a checkpoint is written into DIR/iter_XXXXXXX.tmp, flushed to disk, renamed to its final name
  (os.replace), and only then is latest_checkpointed_iteration.txt replaced the same way: a run
  killed at any moment leaves the pointer naming the previous complete checkpoint. One run at a
  time writes DIR (save_dir.py), so the .tmp directories found by a save are dead runs' and go;
- every file of an iteration directory is listed with its SHA-256 in integrity.json (integrity.py)
  and checked before it is read; a damaged checkpoint is refused with the newest intact iteration
  named (--ckpt-step N loads that one);
- a save that cannot be written (disk full, quota, I/O error) removes its .tmp directory and stops
  the run with SaveError (one line, exit 1): the pointer still names the previous checkpoint;
- anything wrong with --load (no checkpoint, unreadable, truncated or damaged file, other model
  shape or method) is an ArgumentError (message, exit 2) raised before the model is built.
"""

import contextlib
import errno
import math
import os
import random
import re
import shutil
import signal
import time

import numpy as np
import torch

from . import integrity, save_dir
from .arguments import ZERO_METHODS, ArgumentError
from .checkpoint_weights import _first_line, read_deepspeed_file, zero_weights

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
EXIT_NONFINITE = 3  # exit status of a run stopped by non-finite losses
EXIT_SAVE_FAILED = 1  # exit status of a run whose checkpoint could not be written
# Tests only: when set to an iteration, the save of that iteration sleeps after writing its files
# and before publishing them, so a test can kill the process in the middle of a save.
_PAUSE_ENV = "STRONGHOLD_TEST_SAVE_PAUSE_AT"


_ITERATION = re.compile(r"^iter_(\d{7})$")


class SaveError(Exception):
    """A checkpoint that could not be written; the message says why and what is left."""


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


# ----- finding a checkpoint (also used by argument validation) -----

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


def check_load_dir(args) -> None:
    """--load DIR must hold a checkpoint. Only when DIR is also --save may it be empty or absent:
    Megatron-LM's `--save D --load D` habit, which starts fresh and resumes on the next launch."""
    args.load_checkpoint = None
    step = getattr(args, "ckpt_step", None)
    if step is not None:  # Megatron-LM's --ckpt-step: this iteration instead of the pointer's
        if not args.load:
            raise ArgumentError("--ckpt-step needs --load DIR")
        path = iteration_dir(args.load, step)
        if not os.path.isfile(os.path.join(path, FILE)):
            have = ", ".join(map(str, iterations(args.load))) or "none"
            raise ArgumentError(f"--ckpt-step {step}: {path} holds no checkpoint (iterations in {args.load}: {have})")
        args.load_checkpoint = (step, path)
        return
    if not args.load:
        return
    try:
        found = find_checkpoint(args.load)
    except ValueError as exc:
        raise ArgumentError(f"--load {args.load}: {exc}. {newest_intact(args.load)}") from None
    if found is None:
        same = args.save and os.path.abspath(args.save) == os.path.abspath(args.load)
        if not same:
            what = "does not exist" if not os.path.exists(args.load) else f"has no {TRACKER}"
            raise ArgumentError(f"--load {args.load}: the directory {what}, so there is no checkpoint "
                                "to resume from")
    args.load_checkpoint = found


# ----- state that every method shares -----

def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


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


def model_args(args, vocab_size: int) -> dict:
    values = {k: getattr(args, k, None) for k in MODEL_ARGS}
    values["padded_vocab_size"] = int(vocab_size)
    for k in ("tokenizer_model", "vocab_file", "merge_file"):
        if values[k]:
            values[k] = os.path.abspath(values[k])
    return values


def _flag(name: str) -> str:
    return "padded vocabulary size" if name == "padded_vocab_size" else "--" + name.replace("_", "-")


def _own_storage(t):
    """A tensor with the same memory whose storage is exactly its bytes (no copy), so torch.save
    writes this parameter only and not the whole flat buffer it is a view of."""
    if (t.device.type == "cpu" and t.is_contiguous() and t.dtype == torch.float32
            and t.untyped_storage().nbytes() != t.numel() * t.element_size()):
        return torch.from_numpy(t.detach().numpy())
    return t


# ----- saving -----

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(root: str, tmp: str, final: str, iteration) -> None:
    """Rename the finished directory into place, then point the tracker at it (both atomic);
    `iteration` is what the tracker says (a number, or RELEASE)."""
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same iteration saved again: keep the old one until the new is in
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    with open(tracker_tmp, "w") as f:
        f.write(f"{iteration}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tracker_tmp, os.path.join(root, TRACKER))
    _fsync_dir(root)


def save_release(root: str, state: dict) -> str:
    """Write a weights-only checkpoint (tools/convert_hf.py import) as DIR/release, Megatron-LM's
    name for it, with the tracker saying "release"; returns its directory."""
    final = os.path.join(root, RELEASE)
    tmp = final + ".tmp"
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entry = integrity.torch_save({"checkpoint_version": VERSION, "format": "per-parameter", "iteration": 0,
                                  "optimizer": {}, **state}, os.path.join(tmp, FILE))
    integrity.write_manifest(tmp, {FILE: entry})
    _publish(root, tmp, final, RELEASE)
    return final


def _trainer_state(args, iteration, scheduler, scaler, progress, vocab_size, fmt) -> dict:
    return {
        "checkpoint_version": VERSION,
        "format": fmt,
        "method": args.offload_method,
        "iteration": int(iteration),
        "consumed_train_samples": int(progress.get("train", 0)),
        "consumed_valid_samples": int(progress.get("valid", 0)),
        "args": model_args(args, vocab_size),
        "opt_param_scheduler": scheduler.state_dict(),
        "loss_scaler": scaler.state_dict(),
        "rng_state": rng_state(),
    }


def _split(entries: dict):
    """{name: {"param", "exp_avg", ...}} -> the ("model", "optimizer") entries of a checkpoint."""
    model_sd, optimizer = {}, {}
    for key, entry in entries.items():
        model_sd[key] = _own_storage(entry["param"])
        if "exp_avg" in entry:
            optimizer[key] = {"exp_avg": _own_storage(entry["exp_avg"]),
                              "exp_avg_sq": _own_storage(entry["exp_avg_sq"]), "step": int(entry["step"])}
    return model_sd, optimizer


def model_and_optimizer_state(model, method):
    """("model", "optimizer") entries of a per-parameter checkpoint; tensors alias the method's own.
    Data parallel: streamed layers other ranks own are left to their part files (save_checkpoint)."""
    params = method.state_dict()
    elsewhere = method.held_elsewhere()
    model_sd, optimizer = _split(params)
    own = model.state_dict(keep_vars=True)
    for key, value in own.items():
        if key in params or key in elsewhere:
            continue
        if torch.is_tensor(value):  # a buffer (the GPT has none today)
            model_sd[key] = value.detach()
        else:
            model_sd[key] = value  # megatron-core's `_extra_state` entries (None)
    missing = set(params) - set(own)
    if missing:
        raise RuntimeError(f"parameters not in the model's state_dict: {sorted(missing)[:3]}")
    return model_sd, optimizer


def _part_file(rank: int) -> str:
    return f"streamed_layers_rank_{rank:03d}.pt"


class _Failed(Exception):
    """One rank's failure to write its share of a checkpoint (the reason, in words)."""


def _reason(exc: OSError, path: str) -> str:
    reason = f"{exc.strerror or exc} (writing {exc.filename or path})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            reason += f"; {shutil.disk_usage(os.path.dirname(path)).free / 2**30:.2f} GiB free there"
        except OSError:
            pass
    elif exc.errno == errno.EFBIG:
        reason += "; the file would exceed the file-size limit of this process (ulimit -f)"
    return reason


def _save_file(obj, path: str) -> dict:
    try:
        return integrity.torch_save(obj, path)
    except OSError as exc:
        raise _Failed(_reason(exc, path)) from None


def _attempt(step):
    """(None, step()) or (the reason it failed, None): a failure on any rank is every rank's."""
    try:
        return None, step()
    except _Failed as exc:
        return str(exc), None
    except OSError as exc:
        return _reason(exc, exc.filename or "the checkpoint"), None


def _gather(value) -> list:
    """Every rank's value, in rank order; a barrier too."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values
    return [value]


def _stop_if_failed(outcomes, root: str, tmp: str, iteration: int) -> list:
    """The ranks' results; SaveError on every rank if any failed, once the partial save is removed."""
    failed = [reason for reason, _ in outcomes if reason is not None]
    if not failed:
        return [result for _, result in outcomes]
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(os.path.join(root, TRACKER + ".tmp"))
    try:
        found = find_checkpoint(root)
    except ValueError:
        found = None
    named = f"still names iteration {found[0]} ({found[1]})" if found else "names no checkpoint yet"
    raise SaveError(f"cannot save the checkpoint of iteration {iteration} in {root}: {failed[0]}. The partial "
                    f"{os.path.basename(tmp)} was removed; {os.path.join(root, TRACKER)} {named}")


def save_checkpoint(args, iteration, model, method, scheduler, scaler, progress, vocab_size, log) -> None:
    """Write DIR/iter_XXXXXXX for --save DIR with its checksums, then point the tracker at it.
    SaveError when a file cannot be written (disk full, ...), with the partial directory removed."""
    start = time.perf_counter()
    root = args.save
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"

    def prepare():
        os.makedirs(root, exist_ok=True)
        save_dir.remove_partial_saves(root, log)  # this run holds DIR's writer lock: they are dead runs'
        os.makedirs(tmp)
    _stop_if_failed(_gather(_attempt(prepare) if _rank() == 0 else (None, None)), root, tmp, iteration)

    state = _trainer_state(args, iteration, scheduler, scaler, progress, vocab_size, method.checkpoint_format)
    if method.checkpoint_format == "deepspeed":
        def write_share():
            try:
                method.save_engine(root, os.path.basename(tmp))
            except RuntimeError as exc:  # torch.save to a path reports a failed write as RuntimeError
                raise _Failed(f"DeepSpeed could not write its files: {_first_line(exc)}") from None
            return {}  # DeepSpeed's files are hashed by reading them back
    else:
        state.update(method.extra_state())
        # Data parallel: each rank writes the streamed layers it owns into a part file of its own, in
        # the same per-parameter form; the main file names the parts and the loader merges them.
        owners = method.part_owners()  # global ranks holding streamed layers
        if _rank() == 0:
            state["model"], state["optimizer"] = model_and_optimizer_state(model, method)
            state["parts"] = [_part_file(r) for r in owners if r != 0]

        def write_share():
            if _rank() == 0 or _rank() not in owners:
                return {}
            part = {"format": "per-parameter part", "iteration": iteration}
            part["model"], part["optimizer"] = _split(method.streamed_state_dict())
            return {_part_file(_rank()): _save_file(part, os.path.join(tmp, _part_file(_rank())))}
    shares = _stop_if_failed(_gather(_attempt(write_share)), root, tmp, iteration)  # every part is written

    def publish():
        hashed = {name: entry for share in shares for name, entry in share.items()}
        hashed[FILE] = _save_file(state, os.path.join(tmp, FILE))
        integrity.write_manifest(tmp, hashed)
        if os.environ.get(_PAUSE_ENV) == str(iteration):
            log(f"test hook: pausing before publishing {final}")
            time.sleep(600)
        _publish(root, tmp, final, iteration)
    _stop_if_failed(_gather(_attempt(publish) if _rank() == 0 else (None, None)), root, tmp, iteration)
    del state
    if _rank() == 0:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(final) for f in files)
        log(f" successfully saved checkpoint from iteration {iteration:7d} to {root} "
            f"[ {size / 2**30:.3f} GiB, {time.perf_counter() - start:.1f} s ]")


# ----- loading -----

def _read(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated zip, bit rot, a pickle with code in it, ...
        raise ArgumentError(f"cannot read checkpoint {path}: {_first_line(exc)} (a corrupt or incomplete file, "
                            "or not a checkpoint of this trainer)") from None
    if not isinstance(state, dict) or "format" not in state or "iteration" not in state:
        raise ArgumentError(f"{path} is not a checkpoint of this trainer")
    return state


def verify_checkpoint(path: str, iteration: int, root: str, log) -> None:
    """Check the checkpoint's files against their checksums before any is read: rank 0 reads them,
    every rank gets its verdict (ArgumentError for a damaged checkpoint, naming an intact one)."""
    verdict = None
    if _rank() == 0:
        try:
            verified = integrity.verify(path)
        except integrity.Mismatch as exc:
            verdict = ("damaged", f"checkpoint {path} is damaged: {exc}. {newest_intact(root, iteration)}")
        else:
            verdict = ("unverified", f"checkpoint {path} has no {integrity.MANIFEST} (written before checkpoints "
                       "carried checksums): loading it unverified") if verified is None else (
                "verified", f" verified checkpoint {path}: {verified.files} files, {verified.nbytes / 2**30:.3f} GiB, "
                f"SHA-256 in {verified.seconds:.1f} s")
    verdict = _gather(verdict)[0]  # rank 0's
    if verdict[0] == "damaged":
        raise ArgumentError(verdict[1])
    log(verdict[1])


def read_checkpoint(path: str, iteration: int) -> dict:
    """The checkpoint in directory `path` (tensors memory-mapped, not read yet), data-parallel part
    files merged into its "model" and "optimizer" entries; ArgumentError when it is not a whole
    checkpoint of `iteration`."""
    state = _read(os.path.join(path, FILE))
    if state["format"] not in ("deepspeed", "per-parameter"):
        raise ArgumentError(f"{path}: unknown checkpoint format {state['format']!r}")
    if state["iteration"] != iteration:
        raise ArgumentError(f"{path} holds iteration {state['iteration']}, its directory says {iteration}")
    for name in state.get("parts", []):  # streamed layers saved by other data-parallel ranks
        part = _read(os.path.join(path, name))
        if part.get("format") != "per-parameter part" or part["iteration"] != iteration:
            raise ArgumentError(f"{os.path.join(path, name)} is not a part of the iteration-{iteration} checkpoint")
        state["model"].update(part["model"])
        state["optimizer"].update(part["optimizer"])
    state["path"] = path
    return state


def checkpoint_weights(state: dict) -> dict:
    """{GPTModel state_dict name: fp32 tensor} of a checkpoint read by read_checkpoint, whichever
    method wrote it (memory-mapped views; megatron-core's `_extra_state` entries left out)."""
    if state["format"] == "deepspeed":
        return zero_weights(state["path"])
    return {k: v for k, v in state["model"].items() if torch.is_tensor(v)}


def _check_fits(state, args, vocab_size) -> None:
    saved, here = saved_shape(state.get("args", {})), shape_args(args, vocab_size)
    diffs = [f"{_flag(k)} {saved.get(k)} in the checkpoint, {here[k]} here" for k in SHAPE_ARGS
             if saved.get(k) != here[k]]
    if diffs:
        raise ArgumentError(f"checkpoint {state['path']} does not fit this model: " + "; ".join(diffs))


def open_checkpoint(args, vocab_size: int, log):
    """Read the checkpoint --load names (tensors memory-mapped, not read yet) and check that it fits
    this run; set args.iteration and the consumed samples so the data resumes where it stopped.
    With --finetune, or for a release checkpoint, only the weights will be loaded (state
    "finetune"), and the run starts at iteration 0 with fresh optimizer, schedule and data.
    Returns the state, or None without --load. Call before the model is built."""
    args.iteration = 0
    found = getattr(args, "load_checkpoint", None)
    if found is None:
        if args.load:
            log(f"no checkpoint in {args.load} yet: training from scratch")
        return None
    iteration, path = found
    verify_checkpoint(path, iteration, args.load, log)
    state = read_checkpoint(path, iteration)
    fmt, method = state["format"], state.get("method")
    release = os.path.basename(path) == RELEASE
    state["finetune"] = bool(args.finetune) or release
    zero = args.offload_method in ZERO_METHODS
    if not state["finetune"]:
        if fmt == "deepspeed" and not (zero and method == args.offload_method):
            raise ArgumentError(f"{path} is a DeepSpeed checkpoint written by --offload-method {method}: it "
                                f"loads only into {method} runs (this run: {args.offload_method}; --finetune "
                                "takes its weights into any method)")
        if fmt == "per-parameter" and zero:
            raise ArgumentError(f"{path} was written by --offload-method {method}; ZeRO runs load only "
                                "checkpoints written by the same ZeRO method (--finetune takes its weights "
                                "into any method)")
    _check_fits(state, args, vocab_size)
    if state["finetune"]:
        if release and not args.finetune:
            log(f"{path} is a release checkpoint (weights only): fine-tuning from it as --finetune does")
        state["weights"] = checkpoint_weights(state)  # ZeRO's files read as plain data there
        args.consumed_train_samples = args.consumed_valid_samples = 0
        return state
    args.iteration = iteration
    args.consumed_train_samples = state["consumed_train_samples"]
    args.consumed_valid_samples = state["consumed_valid_samples"]
    return state


def _load_per_parameter(sd, optimizer, model, method) -> None:
    """sd: {state_dict name: tensor}; optimizer: {name: Adam state}, or {} for fresh moments."""
    own = model.state_dict(keep_vars=True)
    names = {n for n, _ in model.named_parameters()}
    missing = sorted(k for k, v in own.items() if (k in names or torch.is_tensor(v)) and k not in sd)
    unexpected = sorted(k for k, v in sd.items() if k not in own and v is not None)
    if missing or unexpected:
        raise ValueError(f"{len(missing)} tensors of this model missing from the checkpoint "
                         f"{missing[:3]}, {len(unexpected)} not in this model {unexpected[:3]}")
    params = {}
    for name in names:
        if not torch.is_tensor(sd[name]):
            raise ValueError(f"{name} is not a tensor in the checkpoint")
        params[name] = {"param": sd[name], **optimizer.get(name, {})}
    method.load_state_dict(params)
    for key, value in own.items():  # buffers
        if key not in names and torch.is_tensor(value):
            if value.shape != sd[key].shape:
                raise ValueError(f"{key}: shape {tuple(sd[key].shape)} in the checkpoint, "
                                 f"{tuple(value.shape)} in this model")
            value.data.copy_(sd[key])


def _check_deepspeed_files(path: str) -> None:
    """DeepSpeed unpickles its files with weights_only=False; read them as data first."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".pt") and name != FILE:
            read_deepspeed_file(os.path.join(path, name))


def load_weights_into_model(state, model) -> None:
    """--finetune into a ZeRO method: the weights go into the fp32 model before DeepSpeed takes it
    (DeepSpeed derives its partitions and master weights from the module)."""
    try:
        missing, unexpected = model.load_state_dict(state["weights"], strict=False)
    except Exception as exc:
        raise ArgumentError(f"cannot load the weights of checkpoint {state['path']}: {_first_line(exc)}") from None
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ArgumentError(f"cannot load the weights of checkpoint {state['path']}: {len(missing)} tensors of "
                            f"this model missing {missing[:3]}, {len(unexpected)} not in this model {unexpected[:3]}")
    state["weights_loaded"] = True


def load_checkpoint(state, args, model, method, scheduler, scaler, log) -> None:
    """Put a checkpoint opened by open_checkpoint into the built method; restore schedule, loss
    scale and RNG last, so that the next iteration draws what it would have drawn. A --finetune
    state brings its weights only: optimizer, schedule, loss scale and RNG stay the new run's."""
    start = time.perf_counter()
    path = state["path"]
    if state["finetune"]:
        try:
            if not state.get("weights_loaded"):
                _load_per_parameter(state["weights"], {}, model, method)
        except Exception as exc:
            raise ArgumentError(f"cannot load the weights of checkpoint {path}: {exc}") from None
        log(f" loaded the weights of {path} for fine-tuning [ written by {state['method']} at iteration "
            f"{state['iteration']}; starting at iteration 0 with a fresh optimizer and schedule, "
            f"{time.perf_counter() - start:.1f} s ]")
        return
    try:
        if state["format"] == "deepspeed":
            _check_deepspeed_files(path)
            method.load_engine(*os.path.split(path))
        else:
            _load_per_parameter(state["model"], state["optimizer"], model, method)
            method.load_extra_state(state)
        scheduler.load_state_dict(state["opt_param_scheduler"])
        scaler.load_state_dict(state["loss_scaler"])
    except ArgumentError:
        raise
    except Exception as exc:
        raise ArgumentError(f"cannot load checkpoint {path}: {exc}") from None
    set_rng_state(state["rng_state"], log)
    log(f" successfully loaded checkpoint from {args.load} [ iteration {state['iteration']}, written by "
        f"{state['method']}, {time.perf_counter() - start:.1f} s ]")


# ----- how a run ends -----

class RunGuard:
    """Decides after each iteration whether to save and whether to stop.

    - --save-interval N: save every N iterations; the last iteration and --exit-interval save too.
    - SIGTERM / SIGINT: finish the current iteration, save (with --save), stop: exit status 0 after
      a save, 128 + signal number without one. A second signal stops at once.
    - non-finite losses: the step of such an iteration is always skipped (every method skips a
      step whose gradients are not finite), so the weights stay those of the last good iteration.
      A run stops, without saving, after --exit-on-nonfinite-iters consecutive "bad" iterations:
      a non-finite loss, or (without --fp16) non-finite gradients. With --fp16 an overflow in the
      gradients alone is the loss scaler's business and does not count. No checkpoint is written
      while the last iteration was bad, so the newest checkpoint is the last good one.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, args, save, log):
        self.args, self.save, self.log = args, save, log
        self.received = None
        self.bad = 0
        self.exit_code = 0
        self.saved_at = None
        self.previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}
        return False

    def _handle(self, signum, frame):
        # No logging here: the handler may interrupt a print of the main thread.
        if self.received is not None:  # asked twice: stop now
            signal.signal(signum, self.previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.received = signum

    def _save(self, iteration: int) -> bool:
        if self.saved_at == iteration:
            return True
        if self.bad:
            self.log(f"not saving a checkpoint at iteration {iteration}: its loss is not finite")
            return False
        self.save(iteration)
        self.saved_at = iteration
        return True

    def after_iteration(self, iteration: int, loss: float, skipped: bool) -> bool:
        """True when the run must stop now (self.exit_code says how it ends)."""
        args = self.args
        bad = not math.isfinite(loss) or (skipped and not args.fp16)
        self.bad = self.bad + 1 if bad else 0
        limit = args.exit_on_nonfinite_iters
        if limit and self.bad >= limit:
            where = ""
            if args.save and self.saved_at is not None:
                where = f"; the last good checkpoint is {iteration_dir(args.save, self.saved_at)}"
            elif args.save:
                try:
                    found = find_checkpoint(args.save)
                except ValueError:
                    found = None
                if found:
                    where = f"; the newest checkpoint is {found[1]}"
            self.log(f"error: stopping at iteration {iteration}: the loss or the gradients were not finite "
                     f"in {self.bad} consecutive iteration(s) (--exit-on-nonfinite-iters {limit}); those "
                     f"steps were skipped and nothing was saved{where}")
            self.exit_code = EXIT_NONFINITE
            return True
        exit_now = bool(args.exit_interval) and iteration % args.exit_interval == 0
        if args.save and (iteration == args.train_iters or exit_now
                          or (args.save_interval and iteration % args.save_interval == 0)):
            self._save(iteration)
        if self.received is not None:
            name = signal.Signals(self.received).name
            saved = bool(args.save) and self._save(iteration)
            self.exit_code = 0 if saved else 128 + self.received
            self.log(f"received {name}: stopped after iteration {iteration}, "
                     + (f"checkpoint saved in {args.save}" if saved else "no checkpoint saved (no --save)"
                        if not args.save else "no checkpoint saved (loss not finite)"))
            return True
        if exit_now:
            self.log(f"exiting after iteration {iteration} (--exit-interval {args.exit_interval})")
            return True
        return False
