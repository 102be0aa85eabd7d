#!/usr/bin/env python
"""Tokenize a JSONL corpus into Megatron .bin/.idx files (Megatron-LM compatible CLI).

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text \
        --output-prefix out/corpus --tokenizer-type ByteTokenizer --append-eod --workers 2

writes ``out/corpus_text_document.bin`` / ``.idx`` (megatron-core IndexedDatasetBuilder), which
``--data-path out/corpus_text_document`` reads through megatron-core's GPTDataset.
"""

import argparse
import json
import multiprocessing
import os
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from megatron.stronghold.data import TOKENIZER_TYPES, build_tokenizer  # noqa: E402


class Encoder:
    """Per-process tokenizer holder (tokenizers are built once per worker)."""

    tokenizer = None

    def __init__(self, args):
        self.args = args

    def initializer(self):
        Encoder.tokenizer = build_tokenizer(self.args)

    def encode(self, line):
        """JSON line -> ({key: ids}, {key: [doc length]}, n_bytes); None ids for blank lines."""
        if not line.strip():
            return None, None, len(line)
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            return ("error", f"invalid JSON: {err}"), None, len(line)
        if not isinstance(data, dict):
            return ("error", "a JSONL line must be a JSON object"), None, len(line)
        ids, lens = {}, {}
        for key in self.args.json_keys:
            if key not in data:
                return ("error", f"missing JSON key {key!r}"), None, len(line)
            text = data[key]
            if not isinstance(text, str):
                text = str(text)
            doc_ids = list(Encoder.tokenizer.tokenize(text))
            if len(doc_ids) > 0 and self.args.append_eod:
                doc_ids.append(Encoder.tokenizer.eod)
            ids[key] = doc_ids
            lens[key] = [len(doc_ids)] if doc_ids else []
        return ids, lens, len(line)


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True, help="Path to input JSONL")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"], help="space separate listed of keys to extract"
    )
    group.add_argument("--keep-newlines", action="store_true",
                       help="Accepted for compatibility (no sentence splitting is done)")
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=list(TOKENIZER_TYPES))
    group.add_argument("--vocab-file", type=str, default=None, help="GPT-2 vocab.json")
    group.add_argument("--merge-file", type=str, default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocab size")
    group.add_argument("--append-eod", action="store_true",
                       help="Append an <eod> token to the end of a document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Path to binary output file without suffix")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="Number of worker processes to launch")
    group.add_argument("--log-interval", type=int, default=10000,
                       help="Interval between progress updates (documents)")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    # fields build_tokenizer reads
    args.make_vocab_size_divisible_by = 128
    args.tensor_model_parallel_size = 1
    return args


def _fail(message: str) -> int:
    print(f"preprocess_data.py: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = get_args(argv)
    if not os.path.isfile(args.input):
        return _fail(f"input file not found: {args.input}")
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        return _fail(f"output directory does not exist: {out_dir}")

    try:
        tokenizer = build_tokenizer(args)
    except (ValueError, OSError) as err:
        return _fail(str(err))

    # import megatron-core lazily: keeps `--help` and argument errors fast
    import warnings

    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    import numpy
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = Encoder(args)
    level = "document"
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    prefixes = {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}
    builders = {
        key: IndexedDatasetBuilder(prefix + ".bin", dtype=dtype) for key, prefix in prefixes.items()
    }

    start = time.time()
    total_bytes = 0
    n_docs = 0
    pool = None
    with open(args.input, "r", encoding="utf-8") as fin:
        if args.workers > 1:
            pool = multiprocessing.Pool(args.workers, initializer=encoder.initializer)
            encoded = pool.imap(encoder.encode, fin, 32)
        else:
            encoder.initializer()
            encoded = map(encoder.encode, fin)
        try:
            for line_no, (doc, lens, n_bytes) in enumerate(encoded, start=1):
                total_bytes += n_bytes
                if doc is None:
                    continue
                if isinstance(doc, tuple):
                    raise ValueError(f"{args.input}:{line_no}: {doc[1]}")
                for key in args.json_keys:
                    builders[key].add_document(numpy.asarray(doc[key], dtype=dtype), lens[key])
                n_docs += 1
                if args.log_interval > 0 and n_docs % args.log_interval == 0:
                    elapsed = max(time.time() - start, 1e-9)
                    print(f"Processed {n_docs} documents ({n_docs / elapsed:.1f} docs/s, "
                          f"{total_bytes / elapsed / 1024 / 1024:.2f} MB/s).", file=sys.stderr)
        except (ValueError, UnicodeDecodeError) as err:
            if pool is not None:
                pool.terminate()
            for key, builder in builders.items():
                builder.data_file.close()
                for ext in (".bin", ".idx"):
                    if os.path.exists(prefixes[key] + ext):
                        os.remove(prefixes[key] + ext)
            return _fail(str(err))
        finally:
            if pool is not None:
                pool.close()
                pool.join()

    for key, builder in builders.items():
        builder.finalize(prefixes[key] + ".idx")
        print(f"Wrote {prefixes[key]}.bin/.idx ({n_docs} documents)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
