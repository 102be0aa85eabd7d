"""megatron-core's tokenizers under Megatron-LM's flags, in tools/preprocess_data.py and in training (CPU, offline).

The corpus is real English: the docstrings of Python's own standard library. The Hugging Face tokenizer is trained
here with the tokenizers library, so nothing is downloaded.
"""

import importlib
import inspect
import json
import os
import subprocess
import sys
import types

import numpy
import pytest

from megatron.stronghold import tokenizer as stok
from megatron.stronghold.logs import parse_log

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import preprocess_data  # noqa: E402

EOD = "<|endoftext|>"
VOCAB = 400  # unlike the byte-level tokenizer's 257: the log shows which one trained
MODULES = ("textwrap", "json", "collections", "itertools", "functools", "os", "re", "string", "argparse", "logging",
           "subprocess", "pathlib", "difflib", "shutil", "tarfile", "zipfile", "csv", "datetime", "decimal",
           "fractions", "statistics", "random", "heapq", "bisect", "threading", "socket", "inspect", "pickle",
           "codecs", "contextlib", "dataclasses", "enum", "ast", "calendar", "gettext", "optparse", "configparser",
           "sched", "queue")


def _docstrings():
    """A few hundred documents of English prose: module and public member docstrings of the stdlib."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        members = [obj for key, obj in sorted(vars(module).items()) if not key.startswith("_")
                   and getattr(obj, "__module__", None) == module.__name__]
        methods = [obj for cls in members if inspect.isclass(cls)
                   for key, obj in sorted(vars(cls).items()) if not key.startswith("_")]
        for obj in [module, *members, *methods]:
            doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else ""
            doc = inspect.cleandoc(doc)
            if len(doc) > 300 and doc not in docs:
                docs.append(doc)
    assert len(docs) > 200 and sum(map(len, docs)) > 150_000
    return docs


def _write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")


def _preprocess(*flags, **popen):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), *flags],
                          capture_output=True, text=True, timeout=300, **popen)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tokenizers")
    texts = _docstrings()
    _write_jsonl(d / "corpus.jsonl", texts)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOD],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert bpe.get_vocab_size() == VOCAB
    # A Hugging Face tokenizer directory as users have them: tokenizer.json and a tokenizer_config.json naming eos.
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOD).save_pretrained(str(d / "hf"))
    # The same BPE as GPT-2's two files.
    (d / "gpt2").mkdir()
    bpe.model.save(str(d / "gpt2"))
    return types.SimpleNamespace(dir=d, texts=texts, jsonl=str(d / "corpus.jsonl"), bpe=bpe, hf=str(d / "hf"),
                                 vocab_file=str(d / "gpt2" / "vocab.json"), merge_file=str(d / "gpt2" / "merges.txt"))


@pytest.fixture(scope="module")
def hf_prefix(corpus):
    """The corpus preprocessed by the tool as a user runs it: two workers, the Hugging Face tokenizer."""
    out = corpus.dir / "hf_w2"
    proc = _preprocess("--input", corpus.jsonl, "--json-keys", "text", "--output-prefix", str(out),
                       "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", corpus.hf, "--append-eod",
                       "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done: " in proc.stderr and "tokens" in proc.stderr
    return str(out) + "_text_document"


def _args(**kw):
    base = dict(tokenizer_type=None, tokenizer_model=None, vocab_file=None, merge_file=None, vocab_size=None)
    return types.SimpleNamespace(**{**base, **kw})


@pytest.mark.unit
def test_preprocess_hugging_face_tokenizer_any_number_of_workers(corpus, hf_prefix, tmp_path, monkeypatch, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(corpus.hf)
    ds = IndexedDataset(hf_prefix)
    assert len(ds) == len(corpus.texts)
    assert ds.index.dtype == numpy.uint16
    eod = reference.convert_tokens_to_ids(EOD)
    for i in (0, 1, len(corpus.texts) // 2, len(corpus.texts) - 1):
        assert ds[i].tolist() == reference(corpus.texts[i], add_special_tokens=False).input_ids + [eod]

    # one worker writes the same bytes; a progress line per document when the interval is 0 s
    monkeypatch.setattr(preprocess_data, "PROGRESS_SECONDS", 0.0)
    out = tmp_path / "hf_w1"
    assert preprocess_data.main(["--input", corpus.jsonl, "--output-prefix", str(out), "--tokenizer-model",
                                 os.path.join(corpus.hf, "tokenizer.json"), "--append-eod", "--workers", "1"]) == 0
    for ext in (".bin", ".idx"):
        with open(hf_prefix + ext, "rb") as a, open(f"{out}_text_document{ext}", "rb") as b:
            assert a.read() == b.read(), ext
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Processed ")]
    assert len(progress) == len(corpus.texts)
    tokens = sum(len(ds[i]) for i in range(len(ds)))
    assert progress[-1].startswith(f"Processed {len(corpus.texts)} documents (")
    assert "MB/s" in progress[-1] and f", {tokens} tokens) in " in progress[-1]


@pytest.mark.integration
def test_train_through_the_launcher_on_hugging_face_tokens(corpus, hf_prefix, tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path))
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "examples", "run.sh"), "-m", "stronghold", "-l", "2", "-h", "64", "-b", "4",
         "-w", "1", "--", "--num-attention-heads", "4", "--seq-length", "64", "--train-iters", "30", "--log-interval",
         "5", "--lr", "5e-3", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", corpus.hf,
         "--data-path", hf_prefix, "--data-cache-path", str(tmp_path / "cache")],
        env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "> building HuggingFaceTokenizer tokenizer" in proc.stdout
    assert f"padded vocab (size: {VOCAB}) with {512 - VOCAB} dummy tokens (new size: 512)" in proc.stdout
    losses = [row["lm loss"] for row in parse_log(proc.stdout).iterations]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.unit
def test_gpt2_bpe_from_local_files(corpus, tmp_path):
    """GPT2BPETokenizer reads GPT-2's vocab.json/merges.txt: merges apply in rank order, 'Ġ' is a leading space,
    and the preprocessing tool stores what the tokenizers library encodes."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import pre_tokenizers

    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("\u0120", "w")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab[EOD] = len(vocab)
    (tmp_path / "v.json").write_text(json.dumps(vocab))
    (tmp_path / "m.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = stok.build_tokenizer(_args(vocab_file=str(tmp_path / "v.json"), merge_file=str(tmp_path / "m.txt")))
    assert (tok.vocab_size, tok.eod) == (256 + len(merges) + 1, vocab[EOD])
    ids = tok.tokenize("hello world")
    assert ids == [vocab["hello"], vocab["\u0120w"], vocab["o"], vocab["r"], vocab["l"], vocab["d"]]
    assert tok.detokenize(ids) == "hello world"
    assert tok.tokenize("hel") == [vocab["he"], vocab["l"]]

    out = tmp_path / "gpt2"
    assert preprocess_data.main(["--input", corpus.jsonl, "--output-prefix", str(out), "--tokenizer-type",
                                 "GPT2BPETokenizer", "--vocab-file", corpus.vocab_file, "--merge-file",
                                 corpus.merge_file, "--append-eod", "--workers", "2"]) == 0
    ds = IndexedDataset(f"{out}_text_document")
    eod = corpus.bpe.token_to_id(EOD)
    for i in (0, len(corpus.texts) - 1):
        assert ds[i].tolist() == corpus.bpe.encode(corpus.texts[i]).ids + [eod]
    assert sum(len(ds[i]) for i in range(len(ds))) < 0.7 * sum(len(t.encode()) for t in corpus.texts)


@pytest.mark.unit
def test_byte_level_and_null_tokenizers():
    byte = stok.build_tokenizer(_args())  # megatron-core's ByteLevelTokenizer, eod after the 256 bytes
    assert (byte.vocab_size, byte.eod, byte.pad) == (257, 256, -1)
    assert byte.tokenize("h\u00e9\x00\x01") == [104, 195, 169, 0, 1]
    assert byte.detokenize([104, 195, 169, 256]) == "h\u00e9"
    null = stok.build_tokenizer(_args(tokenizer_type="NullTokenizer", vocab_size=100))
    assert (null.vocab_size, null.eod) == (101, 100)
    assert null.tokenize("1 2 3") == [1, 2, 3]
    assert stok.padded_vocab_size(50257) == 50304 and stok.padded_vocab_size(50257, 128, 2) == 50432
    assert stok.padded_vocab_size(257) == 384 and stok.padded_vocab_size(VOCAB) == 512


@pytest.mark.integration
def test_missing_tokenizer_files_exit_2_with_one_line(corpus, tmp_path, capsys):
    nowhere = str(tmp_path / "nowhere")
    cases = [
        (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", nowhere],
         f"no such tokenizer directory or file: {nowhere}"),
        (["--tokenizer-type", "HuggingFaceTokenizer"], "needs --tokenizer-model"),
        (["--tokenizer-model", str(tmp_path)], "not a Hugging Face tokenizer"),  # a directory without one
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", nowhere, "--merge-file", corpus.merge_file],
         f"--vocab-file file not found: {nowhere}"),
        (["--tokenizer-type", "NullTokenizer"], "needs --vocab-size"),
    ]
    for flags, message in cases:
        assert preprocess_data.main(["--input", corpus.jsonl, "--output-prefix", str(tmp_path / "x"), *flags]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("x")]

    # training: refused before anything is built, through the launcher
    env = dict(os.environ, PYTHON=sys.executable, RESULTS_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "examples", "run.sh"), "-m", "megatron-lm", "-l", "1", "-h",
                           "32", "--", "--num-attention-heads", "4", "--seq-length", "32", "--tokenizer-type",
                           "HuggingFaceTokenizer", "--tokenizer-model", nowhere],
                          env=env, cwd=str(tmp_path), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"error: --tokenizer-model: no such tokenizer directory or file: {nowhere}" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "total parameters" not in proc.stdout
