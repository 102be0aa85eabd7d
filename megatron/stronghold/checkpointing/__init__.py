"""Checkpoints for every method: what they hold (format.py), how they are written (save.py) and
resumed (load.py), one writer per directory (save_dir.py), checksums (integrity.py). How a run
ends (signals, non-finite losses, exit codes) is run_control.py's; ZeRO's own files are read by
checkpointing/deepspeed_files.py.

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
  torch CPU, CUDA when present) and "args": the model's flags (format.MODEL_ARGS: its shape, to refuse a
  mismatch up front, and everything tools/convert_hf.py needs to rebuild it elsewhere, the
  tokenizer and its vocabulary size before padding included);
So a checkpoint written by stronghold loads into megatron-lm or l2l and the other way round, at any
--resident-layers / --window-size, in any precision. StrongHold and L2L write their streamed layers
straight from the host store: the tensors handed to torch.save alias the fp32 masters and Adam
moments, so nothing is staged on the GPU or copied in host memory.

ZeRO (zero-offload, zero-infinity) saves through DeepSpeed's own engine.save_checkpoint into the
same DIR/iter_XXXXXXX/ (DeepSpeed's partitioned files, checkpointing/deepspeed_files.py), beside a model_optim_rng.pt that holds the
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
- anything wrong with --save or --load (not writable; no checkpoint, unreadable, truncated or
  damaged file, other model shape or method) is an ArgumentError (message, exit 2) raised at setup,
  before the model is built (load.prepare_dirs, load.open_checkpoint).
"""

from .format import (FILE, MODEL_ARGS, RELEASE, TRACKER, checkpoint_weights, find_checkpoint, iteration_dir,
                     read_checkpoint, saved_shape)
from .load import (Resume, load_checkpoint, load_weights_into_model, open_checkpoint, prepare_dirs,
                   refuse_overwriting_newer, verify_checkpoint)
from .save import SaveError, save_checkpoint, save_release

__all__ = ["FILE", "MODEL_ARGS", "RELEASE", "TRACKER", "Resume", "SaveError", "checkpoint_weights",
           "find_checkpoint", "iteration_dir", "load_checkpoint", "load_weights_into_model", "open_checkpoint",
           "prepare_dirs", "read_checkpoint", "refuse_overwriting_newer", "save_checkpoint", "save_release", "saved_shape", "verify_checkpoint"]
