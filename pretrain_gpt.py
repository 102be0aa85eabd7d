"""Pretrain a GPT the Megatron-LM way; `--offload-method` picks how its layers are placed.

    python pretrain_gpt.py --num-layers 16 --hidden-size 2048 --num-attention-heads 16 \
        --seq-length 1024 --micro-batch-size 4 --bf16 --offload-method stronghold --window-size 4
"""
import sys

from megatron.stronghold.training import main

if __name__ == "__main__":
    sys.exit(main())
