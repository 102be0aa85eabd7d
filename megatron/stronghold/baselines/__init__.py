"""The methods StrongHold is compared with, one module per baseline.

Every baseline runs behind the trainer's Method interface (see `training.Method`: `train_step`,
`learning_rate`, `pinned_bytes`, `shutdown`, `optimizers`, `executor`), so the trainer's loop,
learning-rate schedule, loss scaler and log lines are shared by every method.

- `l2l`: L2L, one layer at a time on the GPU from StrongHold's host store, no prefetch, optimizer
  after backward (an executor configuration rather than a Method of its own).
- `zero`: ZeRO-Offload (stage 2, optimizer on the CPU) and ZeRO-Infinity (stage 3, parameters and
  optimizer on the CPU), through DeepSpeed itself; their DeepSpeed settings are in `zero_configs`.
"""
