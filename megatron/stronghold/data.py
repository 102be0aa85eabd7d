"""Data side of StrongHold-Megatron: tokenizers, dataset building and batch iterators.

Public API
----------
- ``build_tokenizer(args)``: megatron-core compatible tokenizer (GPT2BPETokenizer,
  ByteTokenizer, NullTokenizer). Also sets ``args.padded_vocab_size`` like Megatron-LM.
- ``padded_vocab_size(vocab_size, make_vocab_size_divisible_by=128, tp=1)``.
- ``check_data_paths(args)``: raise ``ValueError`` naming a missing data/tokenizer file.
- ``build_data_iterators(args, tokenizer)`` -> ``(train_iter, valid_iter)``: infinite
  iterators of micro-batches (dicts of CPU tensors ``tokens``, ``labels``, ``loss_mask``,
  ``position_ids``, each ``[micro_batch_size, seq_length]``).

Datasets are megatron-core ``GPTDataset`` (real data, via ``BlendedMegatronDatasetBuilder``)
or ``MockGPTDataset`` (``args.mock_data`` or no ``args.data_path``).
"""

import json
import logging
import math
import os
import tempfile
import warnings
from collections import OrderedDict
from functools import lru_cache
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy
import torch

logger = logging.getLogger(__name__)

TOKENIZER_TYPES = ("GPT2BPETokenizer", "ByteTokenizer", "NullTokenizer")
DEFAULT_SPLIT = "969,30,1"
_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_BATCH_DTYPES = {
    "tokens": torch.int64,
    "labels": torch.int64,
    "loss_mask": torch.float32,
    "position_ids": torch.int64,
}


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


class _TokenizerBase:
    """Minimal interface used by megatron-core datasets and tools/preprocess_data.py.

    Attributes used by megatron-core: ``vocab_size``, ``eod``, ``unique_identifiers`` (JSON
    serialisable, part of the dataset cache key) and ``pad``. There is no pad token: ``pad`` is
    -1, megatron-core's own 'never in the data' sentinel, so no real token is loss-masked.
    """

    def __init__(self, **identifiers: Any) -> None:
        self.unique_identifiers = OrderedDict()
        self.unique_identifiers["class"] = type(self).__name__
        for key, value in identifiers.items():
            self.unique_identifiers[key] = value if isinstance(value, (int, float)) else str(value)
        self.unique_description = json.dumps(self.unique_identifiers, indent=4)

    # --- to implement ---
    def tokenize(self, text: str) -> List[int]:
        raise NotImplementedError

    def detokenize(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def eod(self) -> int:
        raise NotImplementedError

    # --- common aliases ---
    @property
    def pad(self) -> int:
        """No dedicated pad token: -1 is megatron-core's own 'never in the data' pad id."""
        return -1

    @property
    def eos(self) -> int:
        return self.eod

    def text_to_ids(self, text: str) -> List[int]:
        return self.tokenize(text)

    def ids_to_text(self, ids: Sequence[int]) -> str:
        return self.detokenize(ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eod={self.eod})"


class ByteTokenizer(_TokenizerBase):
    """UTF-8 bytes -> ids 0..255; eod = 256; vocab_size = 257. Needs no files."""

    def __init__(self) -> None:
        super().__init__()

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256

    @property
    def vocab(self) -> Dict[int, int]:
        return {i: i for i in range(256)}

    @property
    def inv_vocab(self) -> Dict[int, int]:
        return self.vocab


class NullTokenizer(_TokenizerBase):
    """Megatron-LM's _NullTokenizer: text is whitespace separated integer ids.

    With ``--vocab-size V``: ids are 0..V-1, eod = V, ``vocab_size`` = V + 1 (so eod is
    ``vocab_size - 1``), exactly as Megatron-LM.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) <= 0:
            raise ValueError("NullTokenizer needs a positive --vocab-size (args.vocab_size)")
        super().__init__(vocab_size=int(vocab_size))
        self._vocab_size_without_eod = int(vocab_size)
        self._eod_id = self._vocab_size_without_eod

    def tokenize(self, text: str) -> List[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(x)) for x in ids)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size_without_eod + 1

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def vocab(self):
        raise NotImplementedError("NullTokenizer has no vocab")

    @property
    def inv_vocab(self):
        raise NotImplementedError("NullTokenizer has no inv_vocab")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _get_pairs(word: Tuple[str, ...]) -> set:
    return {(word[i], word[i + 1]) for i in range(len(word) - 1)}


GPT2_PRETOKENIZE_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


class GPT2BPETokenizer(_TokenizerBase):
    """GPT-2 byte-level BPE from a vocab.json + merges.txt pair (offline; uses ``regex``).

    Same algorithm as Megatron-LM's ``_GPT2BPETokenizer`` / OpenAI's encoder.py:
    ``vocab_size = len(vocab.json)``, ``eod = vocab['<|endoftext|>']``.
    """

    EOD_TOKEN = "<|endoftext|>"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        import regex

        super().__init__(vocab_file=os.path.abspath(vocab_file),
                         merge_file=os.path.abspath(merge_file))
        with open(vocab_file, "r", encoding="utf-8") as f:
            self.encoder: Dict[str, int] = json.load(f)
        if not isinstance(self.encoder, dict):
            raise ValueError(f"{vocab_file}: expected a JSON object token -> id")
        if self.EOD_TOKEN not in self.encoder:
            raise ValueError(f"{vocab_file}: the vocab has no {self.EOD_TOKEN!r} token (eod)")
        self.decoder: Dict[int, str] = {v: k for k, v in self.encoder.items()}
        merges = []
        with open(merge_file, "r", encoding="utf-8") as f:
            for line in f.read().split("\n"):
                if not line.strip() or line.startswith("#version"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{merge_file}: bad merge line {line!r}")
                merges.append(tuple(parts))
        self.bpe_ranks = {pair: i for i, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.pattern = regex.compile(GPT2_PRETOKENIZE_PATTERN)
        self.cache: Dict[str, List[str]] = {}
        self._eod_id = self.encoder[self.EOD_TOKEN]
        # vocab size: Megatron-LM uses len(encoder); be robust to sparse ids.
        self._vocab_size = max(len(self.encoder), max(self.encoder.values()) + 1)

    def bpe(self, token: str) -> List[str]:
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token)
        pairs = _get_pairs(word)
        if not pairs:
            result = [token]
            self.cache[token] = result
            return result
        while True:
            bigram = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _get_pairs(word)
        result = list(word)
        if len(self.cache) < 100_000:
            self.cache[token] = result
        return result

    def tokenize(self, text: str) -> List[int]:
        ids: List[int] = []
        for piece in self.pattern.findall(text):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for bpe_token in self.bpe(piece):
                try:
                    ids.append(self.encoder[bpe_token])
                except KeyError:
                    raise ValueError(
                        f"GPT2BPETokenizer: token {bpe_token!r} is not in the vocab file "
                        f"{self.unique_identifiers['vocab_file']} (the vocab must contain all 256 "
                        f"byte symbols)"
                    ) from None
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def eod(self) -> int:
        return self._eod_id

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder


def padded_vocab_size(vocab_size: int, make_vocab_size_divisible_by: int = 128, tp: int = 1) -> int:
    """Megatron-LM's rule: round vocab_size up to a multiple of divisible_by * tp."""
    multiple = int(make_vocab_size_divisible_by or 1) * int(tp or 1)
    if multiple <= 0:
        raise ValueError("make_vocab_size_divisible_by * tp must be positive")
    return int(math.ceil(int(vocab_size) / multiple) * multiple)


def build_tokenizer(args) -> _TokenizerBase:
    """Build the tokenizer named by ``args.tokenizer_type`` (None -> ByteTokenizer).

    Also sets ``args.padded_vocab_size`` (Megatron-LM behaviour) when ``args`` allows it, using
    ``args.make_vocab_size_divisible_by`` (default 128) and ``args.tensor_model_parallel_size``
    (default 1).
    """
    tokenizer_type = getattr(args, "tokenizer_type", None) or "ByteTokenizer"
    if tokenizer_type == "ByteTokenizer":
        tokenizer = ByteTokenizer()
    elif tokenizer_type == "NullTokenizer":
        vocab_size = getattr(args, "vocab_size", None)
        if vocab_size is None:
            raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
        tokenizer = NullTokenizer(vocab_size)
    elif tokenizer_type == "GPT2BPETokenizer":
        vocab_file = getattr(args, "vocab_file", None)
        merge_file = getattr(args, "merge_file", None)
        _check_tokenizer_files(tokenizer_type, vocab_file, merge_file)
        tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    else:
        raise ValueError(
            f"unsupported --tokenizer-type {tokenizer_type!r}; choose one of {TOKENIZER_TYPES}"
        )
    try:
        args.padded_vocab_size = padded_vocab_size(
            tokenizer.vocab_size,
            getattr(args, "make_vocab_size_divisible_by", None) or 128,
            getattr(args, "tensor_model_parallel_size", None) or 1,
        )
    except (AttributeError, TypeError):  # frozen / slotted args object
        pass
    return tokenizer


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


def _check_tokenizer_files(tokenizer_type, vocab_file, merge_file) -> None:
    if tokenizer_type != "GPT2BPETokenizer":
        return
    for flag, path in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
        if not path:
            raise ValueError(f"GPT2BPETokenizer needs {flag} (GPT-2 vocab.json / merges.txt)")
        if not os.path.isfile(path):
            raise ValueError(f"GPT2BPETokenizer: {flag} file not found: {path}")


def _use_mock(args) -> bool:
    return bool(getattr(args, "mock_data", False)) or parse_data_path(
        getattr(args, "data_path", None)
    ) is None


def check_data_paths(args) -> None:
    """Raise ValueError naming the first missing file: a ``--data-path`` prefix's ``.bin`` /
    ``.idx`` (skipped for mock data) or the GPT-2 vocab/merge files."""
    _check_tokenizer_files(
        getattr(args, "tokenizer_type", None),
        getattr(args, "vocab_file", None),
        getattr(args, "merge_file", None),
    )
    if getattr(args, "tokenizer_type", None) == "NullTokenizer" and getattr(
        args, "vocab_size", None
    ) is None:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
    if _use_mock(args):
        return
    prefixes, _ = parse_data_path(args.data_path)
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
# Datasets and iterators
# --------------------------------------------------------------------------------------------


def _num_samples(args) -> Tuple[int, int]:
    gbs = int(args.global_batch_size)
    train = int(args.train_iters) * gbs
    eval_iters = int(getattr(args, "eval_iters", 0) or 0)
    eval_interval = getattr(args, "eval_interval", None)
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
            for key in _BATCH_KEYS
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
    data_cache_path = getattr(args, "data_cache_path", None)
    if mock:
        path_to_cache = data_cache_path
        split = None  # megatron-core uses "1,1,1" for mock data
    else:
        path_to_cache = data_cache_path or _default_cache_dir(blend[0])
        split = getattr(args, "split", None) or DEFAULT_SPLIT

    config = GPTDatasetConfig(
        random_seed=int(getattr(args, "seed", 1234)),
        sequence_length=int(args.seq_length),
        blend=blend,
        split=split,
        path_to_cache=path_to_cache,
        tokenizer=tokenizer,
        reset_position_ids=bool(getattr(args, "reset_position_ids", False)),
        reset_attention_mask=bool(getattr(args, "reset_attention_mask", False)),
        eod_mask_loss=bool(getattr(args, "eod_mask_loss", False)),
        create_attention_mask=False,
        mmap_bin_files=bool(getattr(args, "mmap_bin_files", True)),
        num_dataset_builder_threads=int(getattr(args, "num_dataset_builder_threads", 1) or 1),
    )
    # We never build a test iterator: drop the test split (train/valid bookends are unchanged,
    # i.e. identical to Megatron-LM's for the same --split). Drop valid when eval_iters == 0.
    config.split_matrix = list(config.split_matrix)
    config.split_matrix[2] = None
    if valid_samples == 0:
        config.split_matrix[1] = None
    if config.split_matrix[0] is None:
        raise ValueError(f"--split {split!r} leaves no training data")
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


def build_data_iterators(args, tokenizer) -> Tuple[Iterator, Optional[Iterator]]:
    """Return ``(train_iter, valid_iter)``: infinite iterators of micro-batch dicts.

    ``valid_iter`` is None when ``args.eval_iters`` is 0 or ``--split`` leaves no validation
    data (a warning says so). Resumes at
    ``args.consumed_train_samples`` / ``args.consumed_valid_samples`` when present.
    Requires torch.distributed (any backend) to be initialised or not initialised at all.
    """
    train_ds, valid_ds = build_datasets(args, tokenizer)
    mbs = int(args.micro_batch_size)
    dp_rank = int(getattr(args, "data_parallel_rank", 0) or 0)
    dp_size = int(getattr(args, "data_parallel_size", 1) or 1)
    train_iter = SequentialBatchIterator(
        train_ds, mbs, dp_rank, dp_size, int(getattr(args, "consumed_train_samples", 0) or 0)
    )
    valid_iter = None
    if valid_ds is not None and len(valid_ds) > 0:
        valid_iter = SequentialBatchIterator(
            valid_ds, mbs, dp_rank, dp_size, int(getattr(args, "consumed_valid_samples", 0) or 0)
        )
    return train_iter, valid_iter
