"""Supervised fine-tuning on chat data (`--sft`): Megatron-LM's JSONL conversations, rendered with the
run's Hugging Face chat template, with loss only on what the assistant says.

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}          one conversation per line

- Which tokens count: a template with `{% generation %}` blocks marks them itself (transformers'
  assistant mask); for one without, each assistant message's tokens, found by rendering the
  conversation up to it (with the generation prompt) and through it. `ChatRenderer.how` says which.
- Sequences: conversations packed in file order into --seq-length (+ 1 for the last label), or with
  --no-sft-packing one per sequence, padded. Either way no token attends across conversations (the
  attention masks by conversation, model.py), positions start at 0 with each, padding carries no
  loss, and so a conversation's loss does not depend on what shares its sequence. A conversation
  longer than the sequence is cut at --seq-length + 1 tokens (one that keeps no assistant token is
  dropped); the log counts both.
- Sources: JSONL files, rendered at start-up, or what tools/preprocess_data.py --sft wrote (rendered
  once, in megatron-core's indexed format: PREFIX and PREFIX_loss_mask); several, weighted or not, as
  --data-path takes pre-training data.
- Bad input (a line that is not JSON or UTF-8, no "messages", an unknown role, no assistant turn, a
  tokenizer without a chat template) is a ConversationError naming the file and line, raised while the
  data is checked, before the model is built.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import List, Tuple

import numpy

ROLES = ("system", "user", "assistant", "tool")
_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ConversationError(ValueError):
    """The user's data or tokenizer cannot be trained on with --sft: the message names where."""


def parse_conversation(raw: bytes):
    """The checked messages ({"role", "content"} dicts) of one JSONL line, or None for a blank line;
    a ConversationError says what is wrong (the caller adds where)."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConversationError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConversationError(f"not a JSON object ({exc.msg})") from None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise ConversationError('no "messages" list (one {"messages": [...]} per line)')
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ConversationError(f"message {k} has role {role!r}, not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ConversationError(f"message {k} ({role}) has no text content")
    if not any(m["role"] == "assistant" for m in messages):
        raise ConversationError("the conversation has no assistant message to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def read_conversations(path: str) -> List[list]:
    """The conversations of a JSONL file, each a list of {"role", "content"} messages, checked."""
    conversations = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                messages = parse_conversation(raw)
            except ConversationError as exc:
                raise ConversationError(f"{path}:{number}: {exc}") from None
            if messages is not None:
                conversations.append(messages)
    if not conversations:
        raise ConversationError(f"{path}: no conversation in the file")
    return conversations


class ChatRenderer:
    """Token ids and the loss mask (1 where the assistant speaks) of a conversation, by the tokenizer's
    own chat template (transformers' apply_chat_template)."""

    def __init__(self, hf_tokenizer, source: str):
        template = getattr(hf_tokenizer, "chat_template", None)
        if not template:
            raise ConversationError(f"{source} has no chat template: --sft renders conversations with it "
                                    "(add one to its tokenizer_config.json)")
        self.tokenizer = hf_tokenizer
        self.generation_blocks = bool(_GENERATION_BLOCK.search(template))
        self.how = ("the tokens the chat template marks as generated ({% generation %} blocks)" if self.generation_blocks
                    else "each assistant message's tokens (the template has no {% generation %} blocks)")

    def _ids(self, messages, **kwargs) -> list:
        out = self.tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def render(self, messages: list) -> Tuple[list, list]:
        if self.generation_blocks:
            out = self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                     return_assistant_tokens_mask=True)
            return list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
        ids = self._ids(messages)
        mask = [0] * len(ids)
        for j, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._ids(messages[:j], add_generation_prompt=True) if j else []
            through = self._ids(messages[:j + 1])
            if ids[:len(before)] != before or ids[:len(through)] != through:
                raise ConversationError("the chat template does not render a conversation's beginning as a prefix "
                                        "of the whole, so assistant tokens cannot be told apart: use a template "
                                        "with {% generation %} blocks")
            mask[len(before):len(through)] = [1] * (len(through) - len(before))
        return ids, mask


@dataclass
class SFTDataset:
    """Map-style dataset of sequences (the keys data.SequentialBatchIterator stacks), each one or more
    whole conversations followed by padding. Positions restart with each conversation; with
    `segments`, each token also carries its conversation's number, and the attention (model.py) lets a
    token see only its own conversation's earlier tokens. Padding continues the last conversation: it
    comes after everything real, so causal attention keeps it out of every loss, and it carries none."""
    sequences: List[List[Tuple[numpy.ndarray, numpy.ndarray]]]  # (ids, mask) per conversation
    seq_length: int
    pad_id: int
    segments: bool = False  # packed: emit each token's conversation number

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        n = self.seq_length + 1
        tokens = numpy.full(n, self.pad_id, dtype=numpy.int64)
        generated = numpy.zeros(n, dtype=numpy.float32)
        positions = numpy.arange(n, dtype=numpy.int64)
        segment = numpy.zeros(n, dtype=numpy.int64)
        start = 0
        for number, (ids, mask) in enumerate(self.sequences[i]):
            end = start + len(ids)
            tokens[start:end] = ids
            # a conversation's first token follows nothing of its own: it is never predicted
            generated[start + 1:end] = mask[1:]
            positions[start:] = numpy.arange(n - start)
            segment[start:] = number
            start = end
        # position t predicts token t + 1: it counts where that token is the assistant's
        item = {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": generated[1:], "position_ids": positions[:-1]}
        if self.segments:
            item["segments"] = segment[:-1]
        return item


def pack(samples: list, seq_length: int) -> list:
    """Conversations in order into sequences of at most seq_length + 1 tokens (each already fits):
    a sequence takes the next conversation while it fits, else the next sequence starts."""
    sequences, room = [], 0
    for ids, mask in samples:
        if len(ids) > room:
            sequences.append([])
            room = seq_length + 1
        sequences[-1].append((ids, mask))
        room -= len(ids)
    return sequences


def fit(samples: list, seq_length: int) -> Tuple[list, int, int]:
    """(samples, truncated, dropped): each conversation's (ids, mask) cut at seq_length + 1 tokens; one
    left with no assistant token to predict is dropped."""
    kept, truncated, dropped = [], 0, 0
    for ids, mask in samples:
        if len(ids) > seq_length + 1:
            truncated += 1
            ids, mask = ids[:seq_length + 1], mask[:seq_length + 1]
        if not any(mask[1:]):
            dropped += 1
            continue
        kept.append((numpy.asarray(ids, dtype=numpy.int64), numpy.asarray(mask, dtype=numpy.float32)))
    return kept, truncated, dropped


# tools/preprocess_data.py --sft writes PREFIX.bin/.idx (each conversation's token ids, one sequence per
# conversation) and PREFIX_loss_mask.bin/.idx (its mask, uint8), both megatron-core's indexed format.
MASK_SUFFIX = "_loss_mask"


def is_preprocessed(path: str) -> bool:
    return all(os.path.isfile(path + suffix + ext) for suffix in ("", MASK_SUFFIX) for ext in (".bin", ".idx"))


def read_preprocessed(prefix: str, vocab_size: int) -> list:
    """(ids, mask) of every conversation tools/preprocess_data.py --sft wrote under prefix."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ids, masks = IndexedDataset(prefix), IndexedDataset(prefix + MASK_SUFFIX)
    if not numpy.array_equal(ids.sequence_lengths, masks.sequence_lengths):
        raise ConversationError(f"{prefix}: its {MASK_SUFFIX} files are not of the same conversations "
                                "(run tools/preprocess_data.py --sft again)")
    if len(ids) == 0:
        raise ConversationError(f"{prefix}: no conversation in the files")
    # copies: the datasets' arrays are views of memory maps that close with them
    samples = [(numpy.array(ids[i], dtype=numpy.int64), numpy.array(masks[i], dtype=numpy.float32))
               for i in range(len(ids))]
    largest = max(int(t.max()) for t, _ in samples)
    if largest >= vocab_size:
        raise ConversationError(f"{prefix}: token id {largest} is outside the tokenizer's vocabulary of "
                                f"{vocab_size}: preprocess with the tokenizer you train with")
    return samples


class BlendedDataset:
    """Megatron-LM's weighted blend of datasets over `size` samples: megatron-core's
    build_blending_indices picks each sample's dataset so that every prefix of the blend keeps the
    weights; each dataset gives its samples in order, wrapping around."""

    def __init__(self, datasets: list, weights: list, size: int):
        from megatron.core.datasets import helpers_cpp

        self.datasets = datasets
        self.which = numpy.zeros(size, dtype=numpy.int16)
        self.index = numpy.zeros(size, dtype=numpy.int64)
        normalized = numpy.asarray(weights, dtype=numpy.float64) / sum(weights)
        helpers_cpp.build_blending_indices(self.which, self.index, normalized, len(datasets), size, False)

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i: int) -> dict:
        dataset = self.datasets[self.which[i]]
        return dataset[int(self.index[i]) % len(dataset)]


def build_datasets(args, tokenizer, log=None):
    """(train, valid or None) over the --data-path sources (JSONL files, or tools/preprocess_data.py --sft
    prefixes), rendered with the run's tokenizer (tokenizer.build_tokenizer). Without weights the sources'
    conversations are concatenated and split by --split; with weights each is split on its own and the
    parts are blended, as megatron-core does with pre-training data."""
    from .data import DEFAULT_SPLIT, _num_samples, _split_matrix, parse_data_path
    from .tokenizer import transformers_tokenizer

    paths, weights = parse_data_path(args.data_path)
    for path in paths:
        if not os.path.isfile(path) and not is_preprocessed(path):
            raise ConversationError(f"--sft --data-path: {path} is neither a JSONL file nor the prefix of "
                                    f"tools/preprocess_data.py --sft's output ({path}.bin/.idx and "
                                    f"{path}{MASK_SUFFIX}.bin/.idx)")
    if args.tokenizer_type != "HuggingFaceTokenizer":
        raise ConversationError("--sft renders conversations with a chat template: use --tokenizer-type "
                                "HuggingFaceTokenizer --tokenizer-model DIR")
    hf_tokenizer = transformers_tokenizer(tokenizer)
    renderer = None

    def conversations(path):
        nonlocal renderer
        if is_preprocessed(path):
            return read_preprocessed(path, len(hf_tokenizer))
        if renderer is None:
            renderer = ChatRenderer(hf_tokenizer, f"--tokenizer-model {args.tokenizer_model}")
        return [renderer.render(messages) for messages in read_conversations(path)]

    sources = [conversations(path) for path in paths]
    if weights is None:
        sources, names, weights = [[c for source in sources for c in source]], [", ".join(paths)], [1.0]
    else:
        names = paths
    how = renderer.how if renderer else "the loss masks the files hold"
    seq_length = int(args.seq_length)
    sizes = _num_samples(args)
    # megatron-core's bookends of --split, as for pre-training data (valid only where evaluation asks for it)
    bookends = _split_matrix(args.split or DEFAULT_SPLIT, sizes[1])[:2]
    pad = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else (hf_tokenizer.eos_token_id or 0)
    made = []
    for name, bookend, size in zip(("train", "valid"), bookends, sizes):
        parts = []
        for source, source_name, weight in zip(sources, names, weights):
            n = len(source)
            part = source[round(bookend[0] * n):round(bookend[1] * n)] if bookend else []
            if not part:
                continue
            samples, truncated, dropped = fit(part, seq_length)
            sequences = pack(samples, seq_length) if args.sft_packing else [[sample] for sample in samples]
            tokens = sum(len(ids) for ids, _ in samples)
            if log is not None:
                where = f" ({source_name}, weight {weight:g})" if len(sources) > 1 else ""
                log(f"> sft {name}{where}: {len(samples)} conversations, {truncated} cut at --seq-length "
                    f"{seq_length}, {dropped} dropped (no assistant token left); loss on {how}")
                log(f"> sft {name}{where}: {len(sequences)} sequences of {seq_length + 1} tokens "
                    f"({'packed' if args.sft_packing else 'one conversation each'}), "
                    f"{100 * tokens / max(1, len(sequences) * (seq_length + 1)):.0f}% of them conversation, "
                    f"the rest padding")
            if sequences:
                parts.append((SFTDataset(sequences, seq_length, int(pad), segments=args.sft_packing), weight))
        if len(parts) > 1:
            made.append(BlendedDataset([d for d, _ in parts], [w for _, w in parts], size))
        else:
            made.append(parts[0][0] if parts else None)
    if made[0] is None:
        raise ConversationError(f"--sft: no training conversation in {', '.join(paths)} with --split "
                                f"{args.split or DEFAULT_SPLIT}")
    return made[0], made[1]
