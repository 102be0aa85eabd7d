"""Data side of StrongHold-Megatron: dataset building and batch iterators.

Public API
----------
- ``check_data_paths(args)``: raise ``ValueError`` naming a missing data/tokenizer file.
- ``check_data(args, tokenizer)``: raise ``ValueError`` for a bad ``--split`` or a data file that cannot
  be trained on (an index that does not match its ``.bin``, no data, token ids outside the vocabulary).
- ``build_data_iterators(args, tokenizer)`` -> ``(train_iter, valid_iter)``: infinite
  iterators of micro-batches (dicts of CPU tensors ``tokens``, ``labels``, ``loss_mask``,
  ``position_ids``, each ``[micro_batch_size, seq_length]``; packed ``--sft`` data adds ``segments``).

Datasets are megatron-core ``GPTDataset`` (real data, via ``BlendedMegatronDatasetBuilder``)
or ``MockGPTDataset`` (``args.mock_data`` or no ``args.data_path``); the tokenizer is megatron-core's
(``tokenizer.py``).
"""

import hashlib
import os
import re
import struct
import tempfile
import warnings
from collections import namedtuple
from typing import Dict, Iterator, List, Optional, Tuple

import numpy
import torch

from .errors import first_line
from .tokenizer import check_tokenizer_args, default_tokenizer_type

DEFAULT_SPLIT = "969,30,1"
_BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
    "segments": torch.int64,  # packed --sft sequences only: each token's conversation (model.py's attention)
}


# --------------------------------------------------------------------------------------------
# Data paths
# --------------------------------------------------------------------------------------------


def parse_data_path(data_path) -> Optional[Tuple[List[str], Optional[List[float]]]]:
    """Megatron-LM ``--data-path`` -> (prefixes, weights or None); None when empty.

    Accepts ``["p1", "p2"]`` (unweighted) or ``["0.5", "p1", "0.5", "p2"]`` (weighted), or the
    same as one whitespace separated string.
    """
    if data_path is None:
        return None
    if isinstance(data_path, str):
        items = data_path.split()
    else:
        items = []
        for item in data_path:
            items.extend(str(item).split())
    if not items:
        return None

    def _is_number(s: str) -> bool:
        try:
            float(s)
            return True
        except ValueError:
            return False

    if len(items) % 2 == 0 and all(_is_number(items[i]) for i in range(0, len(items), 2)):
        weights = [float(items[i]) for i in range(0, len(items), 2)]
        prefixes = [items[i + 1] for i in range(0, len(items), 2)]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"--data-path weights must be non-negative and not all zero: {weights}")
        return prefixes, weights
    return items, None


def _use_mock(args) -> bool:
    return args.mock_data or parse_data_path(args.data_path) is None


def check_data_paths(args) -> None:
    """Raise ValueError naming the first missing file: a ``--data-path`` prefix's ``.bin`` /
    ``.idx`` (skipped for mock data) or a tokenizer's files."""
    check_tokenizer_args(args)
    if _use_mock(args):
        return
    prefixes, _ = parse_data_path(args.data_path)
    if getattr(args, "sft", False):
        return  # chat data: sft.build_datasets checks its own sources
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            path = prefix + ext
            if not os.path.isfile(path):
                hint = ""
                if prefix.endswith((".bin", ".idx")):
                    hint = " (give the prefix without the .bin/.idx extension)"
                raise ValueError(
                    f"--data-path prefix {prefix!r}: missing data file {path}{hint}"
                )


def _default_cache_dir(prefixes: List[str]) -> str:
    """Next to the (first) data prefix when writable, else a temp dir."""
    data_dir = os.path.dirname(os.path.abspath(prefixes[0]))
    candidate = os.path.join(data_dir, "cache")
    probe = candidate if os.path.isdir(candidate) else data_dir
    if os.access(probe, os.W_OK | os.X_OK):
        return candidate
    return os.path.join(tempfile.gettempdir(), "stronghold_data_cache")


# --------------------------------------------------------------------------------------------
# Data checks: before the model is built, so that bad data costs seconds, not a failed run
# --------------------------------------------------------------------------------------------

# A part of --split as megatron-core reads it (it takes whatever runs of digits and dots it finds).
_SPLIT_PART = re.compile(r"[0-9]+\.?[0-9]*|\.[0-9]+")
_SCAN_CHUNK = 1 << 26  # tokens per numpy.max while scanning a .bin: memory stays at 128-256 MiB

# What an .idx says about its .bin: the token dtype, the sequence count, and the .bin's size in bytes.
Index = namedtuple("Index", "path dtype sequences bin_bytes")


def check_split(split: str) -> None:
    """ValueError unless --split is up to three non-negative numbers (train,valid,test), not all zero.

    megatron-core reads any digits it finds: `abc` would give 0/0 (NaN bookends), `-1,0,0` would read
    as 1,0,0, so only what it reads as written passes."""
    parts = [part.strip() for part in str(split).split(",")]
    if len(parts) > 3 or not all(_SPLIT_PART.fullmatch(part) for part in parts):
        raise ValueError(f"--split {split!r}: give the train,valid,test parts as up to three "
                         f"non-negative numbers, e.g. --split 969,30,1")
    if sum(float(part) for part in parts) == 0:
        raise ValueError(f"--split {split!r}: all parts are zero; give e.g. --split 969,30,1")


def _split_matrix(split: str, valid_samples: int) -> list:
    """megatron-core's bookends of --split, [train, valid, None]: the test split is never built, and
    valid is None without evaluation. ValueError when no training data is left."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
        parse_and_normalize_split,
    )

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    matrix[2] = None
    if valid_samples == 0:
        matrix[1] = None
    if matrix[0] is None:
        raise ValueError(f"--split {split!r} leaves no training data")
    return matrix


def _read_index(prefix: str) -> Index:
    """The .idx's header and last sequence only (the index's arrays are memory-mapped, not read)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    path = prefix + ".idx"
    try:
        index = _IndexReader(path, multimodal=False)
    except (AssertionError, ValueError, OSError, struct.error) as exc:  # megatron-core asserts on a bad header
        raise ValueError(f"{path}: not a megatron-core index (.idx) file: {first_line(exc)}; rebuild it "
                         f"with tools/preprocess_data.py") from None
    n = index.sequence_count
    end = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if n else 0
    result = Index(path, index.dtype, n, end)
    del index  # closes the index's memory map
    return result


def _check_not_empty(index: Index) -> None:
    # megatron-core cannot open a .bin of zero bytes and would loop forever over zero sequences.
    if index.sequences == 0:
        raise ValueError(f"{index.path}: the dataset is empty (no document with any token); "
                         f"rebuild it with tools/preprocess_data.py from a corpus with text")


def _check_bin_size(prefix: str, index: Index) -> None:
    """The .bin holds exactly the tokens the .idx points to: its last sequence's offset + length x the
    dtype's size. A shorter .bin fails only when training reaches the missing part; a .bin beside the
    .idx of another corpus trains on garbage without any error."""
    path = prefix + ".bin"
    size = os.path.getsize(path)
    if size != index.bin_bytes:
        raise ValueError(f"{path} has {size} bytes, but {index.path} describes {index.bin_bytes} bytes: "
                         f"{'a truncated .bin, or ' if size < index.bin_bytes else ''}an .idx of another corpus; "
                         f"rebuild both with tools/preprocess_data.py or copy them again together")


def _largest_token_id(bin_path: str, dtype, cache_dir: str, log=None) -> int:
    """The largest token id in a .bin.

    The indexed format records no largest id, so it is computed: one sequential pass over a memory map
    of the .bin (numpy.max in chunks: flat memory; the disk's read speed bounds it: 2 s for a billion
    uint16 tokens at 1 GB/s, 0.04 s for 512 MiB already in the page cache). So that this happens once per corpus and not at every start, the result is kept in a few bytes in the
    data cache directory (where megatron-core keeps its sample indices), under a name made of the .bin's
    path, size and modification time: a changed .bin is scanned again. A read-only cache only means the
    scan is repeated.
    """
    stat = os.stat(bin_path)
    key = f"{os.path.abspath(bin_path)} {stat.st_size} {stat.st_mtime_ns}"
    record = os.path.join(cache_dir, f"{os.path.basename(bin_path)}-"
                                     f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.max_token_id")
    try:
        with open(record) as f:
            return int(f.read())
    except (OSError, ValueError):
        pass
    if log is not None:
        log(f"> scanning {bin_path} for its largest token id (once: the result is kept in {cache_dir})")
    tokens = numpy.memmap(bin_path, dtype=dtype, mode="r")
    largest = max(int(tokens[i:i + _SCAN_CHUNK].max()) for i in range(0, tokens.shape[0], _SCAN_CHUNK))
    del tokens
    try:
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{record}.{os.getpid()}"
        with open(partial, "w") as f:
            f.write(str(largest))
        os.replace(partial, record)  # ranks that scan at the same time each write a whole file
    except OSError:
        pass
    return largest


# The flags that choose the vocabulary, for each tokenizer type (tokenizer.py).
_VOCABULARY_FLAGS = {"NullTokenizer": "--vocab-size", "HuggingFaceTokenizer": "--tokenizer-model",
                     "GPT2BPETokenizer": "--vocab-file/--merge-file", "ByteLevelTokenizer": "--tokenizer-type"}


def _check_token_ids(prefix: str, index: Index, args, tokenizer, cache_dir: str, log=None) -> None:
    """Every id in the .bin is below the tokenizer's vocab_size: a larger id is an IndexError in the
    embedding, or, below the padded vocabulary (--make-vocab-size-divisible-by), a dummy row trained
    silently: either way the data was tokenized with another tokenizer."""
    vocab_size = int(tokenizer.vocab_size)
    if numpy.iinfo(index.dtype).max < vocab_size:
        return  # the .bin's dtype cannot hold an id outside the vocabulary: nothing to read
    largest = _largest_token_id(prefix + ".bin", index.dtype, cache_dir, log)
    if largest >= vocab_size:
        kind = getattr(args, "tokenizer_type", None) or default_tokenizer_type(args)
        flags = " and ".join(dict.fromkeys(("--tokenizer-type", _VOCABULARY_FLAGS.get(kind, "--tokenizer-type"))))
        raise ValueError(f"{prefix}.bin holds token id {largest}, but the {kind} vocabulary has {vocab_size} ids "
                         f"(0..{vocab_size - 1}): the data was tokenized with another tokenizer; give that one "
                         f"with {flags}")


def check_data(args, tokenizer, log=None) -> None:
    """ValueError for a bad --split, or a --data-path prefix that cannot be trained on: an .idx that
    does not describe its .bin, an empty dataset, token ids outside the tokenizer's vocabulary, or
    no training data in --split's train part. Reads each index and, once per corpus, its .bin (see
    _largest_token_id); runs before the model is built."""
    split = args.split or DEFAULT_SPLIT
    check_split(split)
    if getattr(args, "sft", False):
        return  # sft.build_datasets reads and checks every conversation
    if _use_mock(args):
        return
    prefixes, _ = parse_data_path(args.data_path)
    cache_dir = args.data_cache_path or _default_cache_dir(prefixes)
    for prefix in prefixes:
        index = _read_index(prefix)
        _check_not_empty(index)
        _check_bin_size(prefix, index)
        _check_token_ids(prefix, index, args, tokenizer, cache_dir, log)
    _, valid_samples = _num_samples(args)
    empty = _empty_splits(prefixes, _split_matrix(split, valid_samples))
    if 0 in empty:
        raise ValueError(empty[0] + "; use more data or another --split")


# --------------------------------------------------------------------------------------------
# Datasets and iterators
# --------------------------------------------------------------------------------------------


def _num_samples(args) -> Tuple[int, int]:
    gbs = int(args.global_batch_size)
    train = int(args.train_iters) * gbs
    eval_iters, eval_interval = args.eval_iters, args.eval_interval
    if eval_iters > 0:
        if not eval_interval or int(eval_interval) <= 0:
            raise ValueError("--eval-iters > 0 needs a positive --eval-interval")
        valid = (int(args.train_iters) // int(eval_interval) + 1) * eval_iters * gbs
    else:
        valid = 0
    return train, valid


def _empty_splits(prefixes, split_matrix) -> Dict[int, str]:
    """{split index: reason} for splits holding no tokens in some prefix.

    megatron-core loops forever when asked for samples from a split with zero tokens, so such
    splits must be caught before building.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    names = ("train", "valid", "test")
    empty: Dict[int, str] = {}
    for prefix in prefixes:
        # copy: the index mmap is closed when the IndexedDataset is garbage collected
        indexed = IndexedDataset(prefix, multimodal=False, mmap=True)
        lengths = numpy.array(indexed.sequence_lengths, dtype=numpy.int64, copy=True)
        del indexed
        n = lengths.shape[0]
        for i, bookend in enumerate(split_matrix):
            if bookend is None or i in empty:
                continue
            beg = int(round(bookend[0] * float(n)))
            end = int(round(bookend[1] * float(n)))
            if int(lengths[beg:end].sum()) == 0:
                empty[i] = (
                    f"dataset {prefix!r} ({n} documents): the {names[i]} split "
                    f"(documents {beg}:{end} of --split) holds no tokens"
                )
    return empty


class SequentialBatchIterator:
    """Infinite iterator of micro-batches over a map-style dataset, Megatron-LM sampler order.

    Consumed sample ``i`` is dataset index ``i % len(dataset)``. Each step covers
    ``micro_batch_size * data_parallel_size`` consecutive samples, of which data-parallel rank
    ``r`` takes ``[r * mbs, (r + 1) * mbs)`` (as Megatron-LM's MegatronPretrainingSampler).
    ``consumed_samples`` (global, across data-parallel ranks) can be saved for resumption.
    """

    def __init__(
        self,
        dataset,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        consumed_samples: int = 0,
    ) -> None:
        if len(dataset) <= 0:
            raise ValueError("cannot iterate over an empty dataset")
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(f"bad data parallel rank {data_parallel_rank} of {data_parallel_size}")
        self.dataset = dataset
        self.micro_batch_size = int(micro_batch_size)
        self.data_parallel_rank = int(data_parallel_rank)
        self.data_parallel_size = int(data_parallel_size)
        self.consumed_samples = int(consumed_samples)

    def __iter__(self) -> "SequentialBatchIterator":
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        n = len(self.dataset)
        start = self.consumed_samples + self.data_parallel_rank * self.micro_batch_size
        indices = [(start + k) % n for k in range(self.micro_batch_size)]
        self.consumed_samples += self.micro_batch_size * self.data_parallel_size
        samples = [self.dataset[i] for i in indices]
        return {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(_BATCH_DTYPES[key])
            for key in _BATCH_DTYPES if key in samples[0]
        }


def build_datasets(args, tokenizer):
    """Build (train_ds, valid_ds) megatron-core datasets; valid_ds may be None (no eval)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    train_samples, valid_samples = _num_samples(args)
    mock = _use_mock(args)
    blend = None if mock else parse_data_path(args.data_path)
    data_cache_path = args.data_cache_path
    if mock:
        path_to_cache = data_cache_path
        split = None  # megatron-core uses "1,1,1" for mock data
    else:
        path_to_cache = data_cache_path or _default_cache_dir(blend[0])
        split = args.split or DEFAULT_SPLIT

    config = GPTDatasetConfig(
        random_seed=int(args.seed),
        sequence_length=int(args.seq_length),
        blend=blend,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        # Megatron-LM's defaults for the flags this trainer does not take.
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
        num_dataset_builder_threads=1,
    )
    # We never build a test iterator: drop the test split (train/valid bookends are unchanged,
    # i.e. identical to Megatron-LM's for the same --split). Drop valid when eval_iters == 0.
    config.split_matrix = _split_matrix(config.split, valid_samples)
    if valid_samples and config.split_matrix[1] is None:
        warnings.warn(f"--split {split!r} leaves no validation data: no validation iterator")
        valid_samples = 0
    if not mock:
        empty = _empty_splits(blend[0], config.split_matrix)
        if 0 in empty:
            raise ValueError(empty[0] + "; use more data or another --split")
        if 1 in empty:
            warnings.warn(empty[1] + "; no validation iterator (use another --split to validate)")
            config.split_matrix[1] = None
            valid_samples = 0
    sizes = [train_samples, valid_samples, 0]  # 0 <=> split not built (split_matrix entry None)

    cls = MockGPTDataset if mock else GPTDataset
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        cls, sizes, lambda: True, config
    ).build()
    return train_ds, valid_ds


def build_data_iterators(args, tokenizer, consumed_train_samples: int = 0, consumed_valid_samples: int = 0,
                         datasets=None) -> Tuple[Iterator, Optional[Iterator]]:
    """Return ``(train_iter, valid_iter)``: infinite iterators of micro-batch dicts, starting
    after the samples a resumed run has consumed (checkpointing.Resume).

    ``valid_iter`` is None when ``args.eval_iters`` is 0 or ``--split`` leaves no validation
    data (a warning says so).
    Requires torch.distributed (any backend) to be initialised or not initialised at all.
    """
    train_ds, valid_ds = datasets if datasets is not None else build_datasets(args, tokenizer)
    mbs, dp_rank, dp_size = args.micro_batch_size, args.data_parallel_rank, args.data_parallel_size
    train_iter = SequentialBatchIterator(train_ds, mbs, dp_rank, dp_size, consumed_train_samples)
    valid_iter = None
    if valid_ds is not None and len(valid_ds) > 0:
        valid_iter = SequentialBatchIterator(valid_ds, mbs, dp_rank, dp_size, consumed_valid_samples)
    return train_iter, valid_iter
