"""Tokenizers: megatron-core's (``megatron.core.tokenizers``) under Megatron-LM's flags, from local files only.

    --tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH   a tokenizer directory or its tokenizer.json
    --tokenizer-type GPT2BPETokenizer --vocab-file V --merge-file M
    --tokenizer-type ByteLevelTokenizer                            UTF-8 bytes 0..255, eod 256, no files
    --tokenizer-type NullTokenizer --vocab-size N                  text is space separated ids 0..N-1

``build_tokenizer(args)`` returns megatron-core's tokenizer object (``tokenize``, ``detokenize``,
``vocab_size``, ``eod``, ``unique_identifiers``), which its datasets and ``tools/preprocess_data.py`` use.
Every problem with the flags or the files is a ``ValueError`` with a one-line message.
"""

import math
import os
import tempfile
from dataclasses import dataclass

# Read before transformers and huggingface_hub are imported: a tokenizer is never downloaded.
os.environ["HF_HUB_OFFLINE"] = "1"

TOKENIZER_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "ByteLevelTokenizer", "NullTokenizer")


def default_tokenizer_type(args) -> str:
    """Megatron-LM needs --tokenizer-type; here the files given say which one is meant."""
    if getattr(args, "vocab_file", None):
        return "GPT2BPETokenizer"
    if getattr(args, "tokenizer_model", None):
        return "HuggingFaceTokenizer"
    return "ByteLevelTokenizer"


@dataclass(frozen=True)
class Vocabulary:
    """The tokenizer's ids as the model sees them; checkpoints record all three."""

    size: int         # the tokenizer's vocabulary
    padded_size: int  # rows of the embedding: size padded by Megatron-LM's rule (padded_vocab_size)
    eod: int          # the end-of-document id

    @classmethod
    def of(cls, tokenizer, args) -> "Vocabulary":
        return cls(tokenizer.vocab_size, padded_vocab_size(tokenizer.vocab_size, args.make_vocab_size_divisible_by,
                                                           args.tensor_model_parallel_size), tokenizer.eod)


def check_tokenizer_args(args) -> str:
    """The tokenizer type the flags name; ValueError naming the flag that is missing or the file that
    does not exist (cheap: no loading)."""
    kind = getattr(args, "tokenizer_type", None) or default_tokenizer_type(args)
    if kind not in TOKENIZER_TYPES:
        raise ValueError(f"unsupported --tokenizer-type {kind!r}; choose one of {', '.join(TOKENIZER_TYPES)}")
    if kind == "GPT2BPETokenizer":
        for flag, path in (("--vocab-file", args.vocab_file), ("--merge-file", args.merge_file)):
            if not path:
                raise ValueError(f"GPT2BPETokenizer needs {flag} (GPT-2's vocab.json and merges.txt)")
            if not os.path.isfile(path):
                raise ValueError(f"GPT2BPETokenizer: {flag} file not found: {path}")
    elif kind == "HuggingFaceTokenizer":
        path = getattr(args, "tokenizer_model", None)
        if not path:
            raise ValueError("HuggingFaceTokenizer needs --tokenizer-model (a tokenizer directory or its tokenizer.json)")
        _tokenizer_directory(path)
    elif kind == "NullTokenizer":
        vocab_size = getattr(args, "vocab_size", None)
        if vocab_size is None or vocab_size < 1:
            raise ValueError("NullTokenizer needs --vocab-size N (a positive number of token ids)")
    return kind


def build_tokenizer(args):
    """megatron-core's tokenizer named by ``args.tokenizer_type``; ValueError for bad flags or files."""
    kind = check_tokenizer_args(args)
    if kind == "HuggingFaceTokenizer":
        tokenizer = _from_directory(_tokenizer_directory(args.tokenizer_model), "--tokenizer-model " + args.tokenizer_model)
    elif kind == "GPT2BPETokenizer":
        tokenizer = _gpt2_bpe(args.vocab_file, args.merge_file)
    elif kind == "ByteLevelTokenizer":
        # The 256 bytes, then eod (256), and no pad id: megatron-core's defaults (eod 0, pad 1) would make NUL an
        # end of document and mask the loss on byte 1.
        tokenizer = _megatron_tokenizer(None, "byte-level", special_tokens=["<eod>"], vocab_size=256, _eos_id=256,
                                        _pad_id=-1)
    else:
        tokenizer = _megatron_tokenizer(None, "null", vocab_size=int(args.vocab_size))
    return tokenizer


def transformers_tokenizer(tokenizer):
    """The transformers tokenizer inside megatron-core's HuggingFaceTokenizer (built by build_tokenizer):
    its chat template renders --sft's conversations with the run's own vocabulary."""
    return tokenizer._tokenizer.tokenizer


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule: the embedding has a multiple of divisible_by x tensor-parallel rows."""
    multiple = int(make_vocab_size_divisible_by or 1) * int(tp or 1)
    if multiple <= 0:
        raise ValueError("--make-vocab-size-divisible-by must be positive")
    return int(math.ceil(int(vocab_size) / multiple) * multiple)


def _megatron_tokenizer(path, library: str, **kwargs):
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(tokenizer_path=path, metadata_path={"library": library, "model_type": "gpt"},
                                             **kwargs)


def _tokenizer_directory(path: str) -> str:
    """A Hugging Face tokenizer is a directory (tokenizer.json, tokenizer_config.json naming the special tokens);
    its tokenizer.json stands for the directory it is in."""
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.isfile(path):
        if os.path.basename(path) == "tokenizer.json":
            return os.path.dirname(os.path.abspath(path))
        raise ValueError(f"--tokenizer-model {path}: give a Hugging Face tokenizer directory or its tokenizer.json")
    raise ValueError(f"--tokenizer-model: no such tokenizer directory or file: {path}")


def _from_directory(directory: str, source: str):
    """megatron-core's HuggingFaceTokenizer over a local directory; transformers is needed from here on."""
    try:
        tokenizer = _megatron_tokenizer(directory, "huggingface", use_fast=True)
    except ValueError as exc:  # megatron-core wraps every failure of AutoTokenizer in one ValueError
        first = next((line for line in str(exc).splitlines() if line.strip()), "unreadable")
        raise ValueError(f"{source}: not a Hugging Face tokenizer: {first}") from None
    if tokenizer.eod is None:
        raise ValueError(f"{source}: the tokenizer names no end-of-document token: set \"eos_token\" in its "
                         f"tokenizer_config.json")
    return tokenizer


def _gpt2_bpe(vocab_file: str, merge_file: str):
    """GPT-2's byte-level BPE from local vocab.json and merges.txt files.

    megatron-core's own GPT2BPETokenizer (library "megatron") loads "gpt2" from the Hugging Face hub. The same
    BPE is transformers' GPT2Tokenizer, read here with the tokenizers library and handed to megatron-core's
    HuggingFaceTokenizer through a directory that lives only while it loads.
    """
    from tokenizers.models import BPE
    from transformers import GPT2Tokenizer

    try:
        vocab, merges = BPE.read_file(vocab_file, merge_file)
    except Exception as exc:  # the tokenizers library raises a bare Exception for unreadable files
        raise ValueError(f"GPT2BPETokenizer: cannot read --vocab-file {vocab_file} and --merge-file {merge_file}: "
                         f"{str(exc).splitlines()[0]}") from None
    with tempfile.TemporaryDirectory(prefix="gpt2-bpe-") as directory:
        GPT2Tokenizer(vocab=vocab, merges=merges).save_pretrained(directory)
        tokenizer = _from_directory(directory, f"GPT2BPETokenizer ({vocab_file}, {merge_file})")
    # The directory is gone: the files it came from identify the tokenizer (megatron-core's dataset cache key).
    tokenizer.path = f"{os.path.abspath(vocab_file)} {os.path.abspath(merge_file)}"
    return tokenizer
