"""Packaging for StrongHold-Megatron.

`megatron` is a namespace package shared with megatron-core, so our code is
found with find_namespace_packages and megatron/__init__.py must never exist.
"""
from setuptools import find_namespace_packages, setup

setup(
    name="stronghold-megatron",
    version="0.1.0",
    description="StrongHold offloading for Megatron-LM style GPT training on megatron-core",
    python_requires=">=3.11",
    packages=find_namespace_packages(include=["megatron.stronghold*", "stronghold_ext*"]),
    install_requires=[
        # Install torch first (e.g. torch==2.13.0, see .ci/run): an
        # unsatisfied torch requirement makes pip pick a multi-GB CUDA build.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        # megatron-core's HuggingFaceTokenizer, also behind GPT2BPETokenizer (tokenizer.py); tokenizers
        # reads GPT-2's vocab.json/merges.txt.
        "transformers>=5",
        "tokenizers",
        "pybind11",
        "psutil",
        "numpy",
        "matplotlib",
        "tensorboard",  # --tensorboard-dir: torch.utils.tensorboard writes through it
        # No apex: PyPI's "apex" is an unrelated project.
    ],
    extras_require={
        # Hugging Face tokenizers and tools/convert_hf.py (transformers 5: rope_parameters and dtype in its configs)
        "hf": ["transformers>=5", "tokenizers", "safetensors"],
        "test": ["pytest", "transformers>=5", "tokenizers", "safetensors"],
    },
)
