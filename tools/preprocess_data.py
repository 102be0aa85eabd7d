#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron .bin/.idx files (Megatron-LM's tool and flags).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix out/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model TOKENIZER_DIR --append-eod --workers 8

writes ``out/corpus_text_document.bin`` / ``.idx`` with megatron-core's IndexedDatasetBuilder, which
``--data-path out/corpus_text_document`` reads through megatron-core's GPTDataset. Each line of the input is one
document (a JSON object); each of ``--json-keys`` gives one output. ``--workers N`` tokenizes in N processes;
the output is the same for any N.

With ``--sft`` each line is a conversation (``{"messages": [...]}``, as ``--sft`` training reads it), rendered
with the tokenizer's chat template once: ``out/corpus_sft.bin/.idx`` hold its token ids and
``out/corpus_sft_loss_mask.bin/.idx`` its loss mask (1 on the assistant's tokens, megatron/stronghold/sft.py);
``--sft --data-path out/corpus_sft`` trains on them.
"""

import argparse
import collections
import contextlib
import itertools
import json
import multiprocessing
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from megatron.stronghold import sft  # noqa: E402
from megatron.stronghold.tokenizer import (TOKENIZER_TYPES, build_tokenizer, default_tokenizer_type,  # noqa: E402
                                          transformers_tokenizer)

PROGRESS_SECONDS = 5.0  # a progress line at most this often
LINES_PER_TASK = 64     # documents a worker tokenizes per task
TASKS_PER_WORKER = 4    # tasks in flight per worker: input is read only that far ahead of the output


class Encoder:
    """Tokenizes documents; each worker process builds its own tokenizer once."""

    tokenizer = None

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = build_tokenizer(self.args)
        Encoder.renderer = None

    @classmethod
    def chat_renderer(cls, source: str):
        if getattr(cls, "renderer", None) is None:
            cls.renderer = sft.ChatRenderer(transformers_tokenizer(cls.tokenizer), source)
        return cls.renderer

    def encode_lines(self, lines):
        return [self.encode(line) for line in lines]

    def encode(self, line):
        """JSON line -> ({key: ids}, n_bytes); (None, n) for a blank line, ("error", message) for a bad one
        (not JSON, not an object, a key missing or its value not a string)."""
        n_bytes = len(line.encode("utf-8"))
        if not line.strip():
            return None, n_bytes
        if self.args.sft:
            try:
                ids, mask = self.chat_renderer(f"--tokenizer-model {self.args.tokenizer_model}").render(
                    sft.parse_conversation(line.encode("utf-8")))
            except sft.ConversationError as err:
                return ("error", str(err)), n_bytes
            return {"sft": ids, "sft" + sft.MASK_SUFFIX: mask}, n_bytes
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            return ("error", f"invalid JSON: {err}"), n_bytes
        if not isinstance(data, dict):
            return ("error", "a JSONL line must be a JSON object"), n_bytes
        ids = {}
        for key in self.args.json_keys:
            if key not in data:
                return ("error", f"missing JSON key {key!r}"), n_bytes
            text = data[key]
            if not isinstance(text, str):  # str() would make documents "None", "123", "['a', 'b']"
                return ("error", f"the value of {key!r} is {_json_kind(text)}, not a string"), n_bytes
            try:
                doc_ids = list(Encoder.tokenizer.tokenize(text)) if text else []
            except ValueError as err:  # e.g. NullTokenizer's input is not a list of ids
                return ("error", f"cannot tokenize {key!r}: {err}"), n_bytes
            if doc_ids and self.args.append_eod:
                doc_ids.append(Encoder.tokenizer.eod)
            ids[key] = doc_ids
        return ids, n_bytes


def _json_kind(value) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "an array" if isinstance(value, list) else "an object"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="Path to input JSONL (one JSON object per line)")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Space separated keys to extract; each gives its own .bin/.idx")
    group.add_argument("--sft", action="store_true",
                       help="Each line is a conversation {\"messages\": [...]}: write its token ids by the tokenizer's "
                       "chat template and its loss mask (PREFIX_sft and PREFIX_sft_loss_mask), for --sft training")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Accepted for compatibility (no sentence splitting is done, newlines are kept)")
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, default=None, choices=list(TOKENIZER_TYPES),
                       help="megatron-core's tokenizer (default: GPT2BPETokenizer with --vocab-file, "
                       "HuggingFaceTokenizer with --tokenizer-model, else ByteLevelTokenizer)")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="HuggingFaceTokenizer: a local tokenizer directory or its tokenizer.json")
    group.add_argument("--vocab-file", type=str, default=None, help="GPT2BPETokenizer: GPT-2's vocab.json")
    group.add_argument("--merge-file", type=str, default=None, help="GPT2BPETokenizer: GPT-2's merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: token ids 0..N-1")
    group.add_argument("--append-eod", action="store_true", help="Append an <eod> token to the end of a document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True, help="Path to binary output file without suffix")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1, help="Number of worker processes to launch")
    group.add_argument("--log-interval", type=int, default=0,
                       help=f"A progress line every N documents as well (default: every {PROGRESS_SECONDS:g} s)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def _fail(message: str) -> int:
    print(f"preprocess_data.py: error: {message}", file=sys.stderr, flush=True)
    return 2


def _encoded_documents(encoder, lines, workers):
    """(encoded, n_bytes) per input line, in input order. Several workers get batches of lines, a bounded
    number in flight, so memory stays flat however large the corpus is."""
    if workers == 1:
        if Encoder.tokenizer is None:  # main() hands over the one it built
            encoder.initializer()
        yield from map(encoder.encode, lines)
        return
    with multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        pending = collections.deque()
        while True:
            batch = list(itertools.islice(lines, LINES_PER_TASK))
            if batch:
                pending.append(pool.apply_async(encoder.encode_lines, (batch,)))
            if pending and (not batch or len(pending) >= TASKS_PER_WORKER * workers):
                yield from pending.popleft().get()
            elif not batch:
                return


class _Progress:
    def __init__(self, log_interval: int):
        self.start = self.last = time.monotonic()
        self.log_interval = log_interval
        self.documents = self.bytes = self.tokens = 0

    def add(self, n_bytes: int, n_tokens: int, document: bool) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        self.documents += document
        now = time.monotonic()
        by_count = document and self.log_interval > 0 and self.documents % self.log_interval == 0
        if by_count or now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line("Processed"), file=sys.stderr, flush=True)

    def line(self, verb: str) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        return (f"{verb} {self.documents} documents ({self.documents / elapsed:.1f} docs/s, "
                f"{self.bytes / elapsed / 1e6:.2f} MB/s, {self.tokens} tokens) in {elapsed:.1f} s.")


def main(argv=None) -> int:
    args = get_args(argv)
    if not os.path.isfile(args.input):
        return _fail(f"input file not found: {args.input}")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        return _fail(f"output directory does not exist: {out_dir}")
    # Each worker is a process of its own: the Rust tokenizers need no thread pool of their own in it.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        tokenizer = build_tokenizer(args)
    except ValueError as err:
        return _fail(str(err))
    Encoder.tokenizer = tokenizer  # one worker uses it as it is; a pool's processes build their own

    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    ids_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    if args.sft:  # the ids and, beside them, the loss mask of each conversation
        if (args.tokenizer_type or default_tokenizer_type(args)) != "HuggingFaceTokenizer":
            return _fail("--sft renders conversations with a chat template: use --tokenizer-type "
                         "HuggingFaceTokenizer --tokenizer-model DIR")
        keys, dtypes = ["sft", "sft" + sft.MASK_SUFFIX], {"sft": ids_dtype, "sft" + sft.MASK_SUFFIX: numpy.uint8}
        prefixes = {key: f"{args.output_prefix}_{key}" for key in keys}
        try:
            Encoder.chat_renderer(f"--tokenizer-model {args.tokenizer_model}")
        except sft.ConversationError as err:
            return _fail(str(err))
    else:
        keys, dtypes = args.json_keys, {key: ids_dtype for key in args.json_keys}
        prefixes = {key: f"{args.output_prefix}_{key}_document" for key in keys}
    # Written under temporary names and renamed at the end: a failed run leaves earlier outputs as they were.
    partial = {key: (prefix + ".bin.partial", prefix + ".idx.partial") for key, prefix in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(partial[key][0], dtype=dtypes[key]) for key in keys}
    progress = _Progress(args.log_interval)
    tokens = collections.Counter()  # per key
    try:
        with open(args.input, "r", encoding="utf-8") as lines, \
                contextlib.closing(_encoded_documents(Encoder(args), lines, args.workers)) as encoded:
            for line_no, (doc, n_bytes) in enumerate(encoded, start=1):
                if doc is None:
                    progress.add(n_bytes, 0, False)
                    continue
                if isinstance(doc, tuple):
                    raise ValueError(f"{args.input}:{line_no}: {doc[1]}")
                for key in keys:
                    ids = doc[key]
                    builders[key].add_document(numpy.asarray(ids, dtype=dtypes[key]), [len(ids)] if ids else [])
                progress.add(n_bytes, len(doc[keys[0]]) if args.sft else sum(len(ids) for ids in doc.values()), True)
                tokens.update({key: len(ids) for key, ids in doc.items()})
        for key in keys:  # an index with no token is a dataset training cannot open
            if not tokens[key]:
                what = "conversation" if args.sft else f"document with text under {key!r}"
                raise ValueError(f"{args.input}: no {what} ({progress.documents} documents read): nothing to write")
        for key, builder in builders.items():
            builder.finalize(partial[key][1])
    except (ValueError, UnicodeDecodeError) as err:
        for key, builder in builders.items():
            builder.data_file.close()
            for path in partial[key]:
                if os.path.exists(path):
                    os.remove(path)
        return _fail(str(err))
    for key, prefix in prefixes.items():
        os.replace(partial[key][0], prefix + ".bin")
        os.replace(partial[key][1], prefix + ".idx")
        print(f"Wrote {prefix}.bin/.idx", file=sys.stderr)
    print(progress.line("Done:"), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
