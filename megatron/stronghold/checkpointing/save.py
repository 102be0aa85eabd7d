"""Writing checkpoints: every rank's share into DIR/iter_XXXXXXX.tmp, checksums, then an atomic
rename and the tracker (the rules are in checkpointing/__init__.py)."""

import contextlib
import errno
import os
import shutil
import time

import torch

from ..distributed import gather, global_rank
from ..errors import first_line
from ..methods.registry import spec
from . import integrity, save_dir
from .format import (OPTIMIZER_ARGS, FILE, RELEASE, TRACKER, VERSION, find_checkpoint, iteration_dir, model_args, part_file,
                     rng_state, split_entries)

# Tests only: when set to an iteration, the save of that iteration sleeps after writing its files
# and before publishing them, so a test can kill the process in the middle of a save.
_PAUSE_ENV = "STRONGHOLD_TEST_SAVE_PAUSE_AT"


class SaveError(Exception):
    """A checkpoint that could not be written; the message says why and what is left."""


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


def _trainer_state(args, iteration, scheduler, scaler, progress, vocab, fmt) -> dict:
    return {
        "checkpoint_version": VERSION,
        "format": fmt,
        "method": args.offload_method,
        "iteration": int(iteration),
        "consumed_train_samples": int(progress.get("train", 0)),
        "consumed_valid_samples": int(progress.get("valid", 0)),
        "args": model_args(args, vocab),
        "optimizer_args": {k: getattr(args, k) for k in OPTIMIZER_ARGS},
        "opt_param_scheduler": scheduler.state_dict(),
        "loss_scaler": scaler.state_dict(),
        "rng_state": rng_state(),
    }


def model_and_optimizer_state(model, method):
    """("model", "optimizer") entries of a per-parameter checkpoint; tensors alias the method's own.
    Data parallel: streamed layers other ranks own are left to their part files (save_checkpoint)."""
    params = method.state_dict()
    elsewhere = method.held_elsewhere()
    model_sd, optimizer = split_entries(params)
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


def _stop_if_failed(outcomes, root: str, tmp: str, iteration: int) -> list:
    """The ranks' results; SaveError on every rank if any failed, once the partial save is removed."""
    failed = [reason for reason, _ in outcomes if reason is not None]
    if not failed:
        return [result for _, result in outcomes]
    if global_rank() == 0:
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


def save_checkpoint(args, iteration, model, method, scheduler, scaler, progress, vocab, log) -> None:
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
    _stop_if_failed(gather(_attempt(prepare) if global_rank() == 0 else (None, None)), root, tmp, iteration)

    kind = spec(method.name).checkpoint
    state = _trainer_state(args, iteration, scheduler, scaler, progress, vocab, kind)
    if kind == "deepspeed":
        def write_share():
            try:
                method.save_engine(root, os.path.basename(tmp))
            except RuntimeError as exc:  # torch.save to a path reports a failed write as RuntimeError
                raise _Failed(f"DeepSpeed could not write its files: {first_line(exc)}") from None
            return {}  # DeepSpeed's files are hashed by reading them back
    else:
        state.update(method.extra_state())
        # Data parallel: each rank writes the streamed layers it owns into a part file of its own, in
        # the same per-parameter form; the main file names the parts and the loader merges them.
        owners = method.part_owners()  # global ranks holding streamed layers
        if global_rank() == 0:
            state["model"], state["optimizer"] = model_and_optimizer_state(model, method)
            state["parts"] = [part_file(r) for r in owners if r != 0]

        def write_share():
            if global_rank() == 0 or global_rank() not in owners:
                return {}
            part = {"format": "per-parameter part", "iteration": iteration}
            part["model"], part["optimizer"] = split_entries(method.part_state_dict())
            return {part_file(global_rank()): _save_file(part, os.path.join(tmp, part_file(global_rank())))}
    shares = _stop_if_failed(gather(_attempt(write_share)), root, tmp, iteration)  # every part is written

    def publish():
        hashed = {name: entry for share in shares for name, entry in share.items()}
        hashed[FILE] = _save_file(state, os.path.join(tmp, FILE))
        integrity.write_manifest(tmp, hashed)
        if os.environ.get(_PAUSE_ENV) == str(iteration):
            log(f"test hook: pausing before publishing {final}")
            time.sleep(600)
        _publish(root, tmp, final, iteration)
    _stop_if_failed(gather(_attempt(publish) if global_rank() == 0 else (None, None)), root, tmp, iteration)
    if global_rank() == 0:
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(final) for f in files)
        log(f" successfully saved checkpoint from iteration {iteration:7d} to {root} "
            f"[ {size / 2**30:.3f} GiB, {time.perf_counter() - start:.1f} s ]")
