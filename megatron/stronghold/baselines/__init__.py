"""The methods StrongHold is compared with, one module per baseline.

Each module builds an object with the trainer's Method interface (see `training.Method`):
`train_step`, `learning_rate`, `pinned_bytes`, `shutdown`, `optimizers` and `executor`, so the
trainer's loop, learning-rate schedule, loss scaler and log lines are shared by every method.

- `zero`: ZeRO-Offload (stage 2, optimizer on the CPU) and ZeRO-Infinity (stage 3, parameters and
  optimizer on the CPU), through DeepSpeed itself; their DeepSpeed settings are in `zero_configs`.
"""
