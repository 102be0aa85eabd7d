"""Resuming: find the checkpoint --load names, check it against this run before the model is
built, then put it into the built method (the rules are in checkpointing/__init__.py)."""

import os
import time
from dataclasses import dataclass

import torch

from ..distributed import gather, global_rank
from ..errors import ArgumentError, first_line
from ..methods.registry import spec
from . import integrity
from .format import (FILE, RELEASE, SHAPE_ARGS, TRACKER, checkpoint_weights, find_checkpoint, flag, iteration_dir,
                     iterations, newest_intact, read_checkpoint, saved_shape, set_rng_state, shape_args,
                     shape_mismatch)


# What a checkpoint that does not fit this model raises (a missing or extra name, another shape, an entry
# of another kind; DeepSpeed's engine also asserts): the user's to fix, exit 2. Anything else (out of
# memory, a bug) keeps its traceback.
USER_FIXABLE = (ValueError, KeyError)


def prepare_dirs(args):
    """Setup's look at --save and --load, before anything large is allocated: --save DIR is created
    and must be writable; --load DIR must hold a checkpoint, unless it is also --save (Megatron-LM's
    `--save D --load D` habit, which starts fresh and resumes on the next launch). Returns the
    (iteration, directory) to resume from, or None; ArgumentError otherwise. No tensor is read."""
    if args.save:
        try:
            os.makedirs(args.save, exist_ok=True)
        except OSError as exc:
            raise ArgumentError(f"--save {args.save}: cannot create the directory ({exc.strerror})") from None
        if not os.access(args.save, os.W_OK | os.X_OK):
            raise ArgumentError(f"--save {args.save}: the directory is not writable")
    return _find_resume_point(args)


def refuse_overwriting_newer(args, found) -> None:
    """A run never writes over a newer checkpoint in --save nor moves its pointer back: with checkpoints
    there, it must resume from the newest (ArgumentError, naming it and the flags that would do). Called
    while the run holds --save's writer lock, so no other run adds checkpoints meanwhile."""
    saved = iterations(args.save) if args.save else []
    if not saved:
        return
    start = 0 if found is None or args.finetune or os.path.basename(found[1]) == RELEASE else found[0]
    if start >= saved[-1]:
        return
    if not args.load:
        raise ArgumentError(f"--save {args.save} already holds checkpoints (newest: iteration {saved[-1]}), and "
                            f"this run would start from iteration 0 and write over them. Resume with --load "
                            f"{args.save}, or start over with another --save directory")
    raise ArgumentError(f"--save {args.save} holds iteration {saved[-1]}, newer than the iteration this run "
                        f"starts from ({start}): its checkpoints would be written over and "
                        f"{TRACKER} moved back. Save to another directory")


def _find_resume_point(args):
    if not args.load:
        return None
    if args.ckpt_step is not None:  # Megatron-LM's --ckpt-step: this iteration instead of the pointer's
        path = iteration_dir(args.load, args.ckpt_step)
        if not os.path.isfile(os.path.join(path, FILE)):
            have = ", ".join(map(str, iterations(args.load))) or "none"
            raise ArgumentError(f"--ckpt-step {args.ckpt_step}: {path} holds no checkpoint (iterations in "
                                f"{args.load}: {have})")
        return args.ckpt_step, path
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
    return found


@dataclass
class Resume:
    """A checkpoint opened for this run: read and checked, its tensors memory-mapped, not loaded."""

    state: dict
    iteration: int               # the run continues after this iteration (0 when fine-tuning)
    consumed_train_samples: int  # where the data continues
    consumed_valid_samples: int

    @property
    def finetune(self) -> bool:
        return self.state["finetune"]


def verify_checkpoint(path: str, iteration: int, root: str, log) -> None:
    """Check the checkpoint's files against their checksums before any is read: rank 0 reads them,
    every rank gets its verdict (ArgumentError for a damaged checkpoint, naming an intact one)."""
    verdict = None
    if global_rank() == 0:
        try:
            verified = integrity.verify(path)
        except integrity.Mismatch as exc:
            verdict = ("damaged", f"checkpoint {path} is damaged: {exc}. {newest_intact(root, iteration)}")
        else:
            verdict = ("unverified", f"checkpoint {path} has no {integrity.MANIFEST} (written before checkpoints "
                       "carried checksums): loading it unverified") if verified is None else (
                "verified", f" verified checkpoint {path}: {verified.files} files, {verified.nbytes / 2**30:.3f} GiB, "
                f"SHA-256 in {verified.seconds:.1f} s")
    verdict = gather(verdict)[0]  # rank 0's
    if verdict[0] == "damaged":
        raise ArgumentError(verdict[1])
    log(verdict[1])


def _check_fits(state, args, vocab_size) -> None:
    saved, here = saved_shape(state.get("args", {})), shape_args(args, vocab_size)
    diffs = [f"{flag(k)} {saved.get(k)} in the checkpoint, {here[k]} here" for k in SHAPE_ARGS
             if saved.get(k) != here[k]]
    if diffs:
        raise ArgumentError(f"checkpoint {state['path']} does not fit this model: " + "; ".join(diffs))


def open_checkpoint(args, found, vocab_size: int, log) -> Resume | None:
    """Read the checkpoint `found` (prepare_dirs' answer) and check that it fits this run. With
    --finetune, or for a release checkpoint, only the weights will be loaded, and the run starts at
    iteration 0 with fresh optimizer, schedule and data. None without a checkpoint to resume.
    Call before the model is built."""
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
    zero = spec(args.offload_method).deepspeed
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
    if not state["finetune"] and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
        from ..optim import schedule_differences

        changed = schedule_differences(args, state["opt_param_scheduler"])
        if changed:
            raise ArgumentError(f"--load {path}: this run's learning-rate schedule differs from the checkpoint's "
                                f"({'; '.join(changed)}). Add --override-opt_param-scheduler to follow the "
                                "flags from here on, or --use-checkpoint-opt_param-scheduler to keep the "
                                "checkpoint's schedule")
    if state["finetune"]:
        if release and not args.finetune:
            log(f"{path} is a release checkpoint (weights only): fine-tuning from it as --finetune does")
        state["weights"] = checkpoint_weights(state)  # ZeRO's files read as plain data there
        return Resume(state, 0, 0, 0)
    return Resume(state, iteration, state["consumed_train_samples"], state["consumed_valid_samples"])


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
                raise ValueError(shape_mismatch(key, sd[key].shape, value.shape))
            value.data.copy_(sd[key])


def load_weights_into_model(resume: Resume, model) -> None:
    """--finetune into a ZeRO method: the weights go into the fp32 model before DeepSpeed takes it
    (DeepSpeed derives its partitions and master weights from the module)."""
    state = resume.state
    try:
        missing, unexpected = model.load_state_dict(state["weights"], strict=False)
    except (RuntimeError, *USER_FIXABLE) as exc:  # torch's shape mismatch is a RuntimeError
        raise ArgumentError(f"cannot load the weights of checkpoint {state['path']}: {first_line(exc)}") from None
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ArgumentError(f"cannot load the weights of checkpoint {state['path']}: {len(missing)} tensors of "
                            f"this model missing {missing[:3]}, {len(unexpected)} not in this model {unexpected[:3]}")
    state["weights_loaded"] = True


def load_checkpoint(resume: Resume, args, model, method, scheduler, scaler, log) -> None:
    """Put a checkpoint opened by open_checkpoint into the built method; restore schedule, loss
    scale and RNG last, so that the next iteration draws what it would have drawn. A --finetune
    state brings its weights only: optimizer, schedule, loss scale and RNG stay the new run's."""
    state = resume.state
    start = time.perf_counter()
    path = state["path"]
    if state["finetune"]:
        try:
            if not state.get("weights_loaded"):
                _load_per_parameter(state["weights"], {}, model, method)
        except USER_FIXABLE as exc:
            raise ArgumentError(f"cannot load the weights of checkpoint {path}: {exc}") from None
        log(f" loaded the weights of {path} for fine-tuning [ written by {state['method']} at iteration "
            f"{state['iteration']}; starting at iteration 0 with a fresh optimizer and schedule, "
            f"{time.perf_counter() - start:.1f} s ]")
        return
    try:
        if state["format"] == "deepspeed":
            method.load_engine(*os.path.split(path))
        else:
            _load_per_parameter(state["model"], state["optimizer"], model, method)
            method.load_extra_state(state)
        scheduler.load_state_dict(state["opt_param_scheduler"])
        scheduler.step(increment=0)  # megatron-core sets the groups' values before it reads the weight decay
        scaler.load_state_dict(state["loss_scaler"])
    except ArgumentError:
        raise
    except torch.OutOfMemoryError:
        raise
    except USER_FIXABLE + ((RuntimeError, AssertionError) if state["format"] == "deepspeed" else ()) as exc:
        raise ArgumentError(f"cannot load checkpoint {path}: {exc}") from None
    set_rng_state(state["rng_state"], log)
    saved = state.get("optimizer_args", {})  # checkpoints before these flags kept fp32 moments
    converted = [f"--{k.replace('_', '-')} {saved.get(k, 'fp32')} -> {getattr(args, k)}"
                 for k in ("exp_avg_dtype", "exp_avg_sq_dtype") if saved.get(k, "fp32") != getattr(args, k)]
    if converted and state["optimizer"]:
        log(f" the checkpoint's Adam moments were converted to this run's dtypes ({', '.join(converted)}; "
            "into bf16 rounded to nearest)")
    log(f" successfully loaded checkpoint from {args.load} [ iteration {state['iteration']}, written by "
        f"{state['method']}, {time.perf_counter() - start:.1f} s ]")
