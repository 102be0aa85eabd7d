"""Tests for megatron/stronghold/data.py and tools/preprocess_data.py (CPU, no network)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import types

import numpy
import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

from megatron.stronghold import data as sdata  # noqa: E402
from megatron.stronghold.tokenizer import build_tokenizer  # noqa: E402

sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
import preprocess_data  # noqa: E402

EXTRA_DOC = "Unicode check: h\u00e9llo w\u00f6rld \u2014 \u00fcn\u00efc\u00f8d\u00e9 \u2713 \u4e2d\u6587 \U0001f600\n"


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist():
    """gloo world of size 1 + megatron-core model parallel (1, 1), as the trainer sets up."""
    from megatron.core import parallel_state

    created = False
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
        )
        created = True
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if created:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def _stdlib_texts():
    """Real text found on this machine: some of Python's own stdlib sources."""
    stdlib = os.path.dirname(os.__file__)
    names = ["textwrap.py", "string.py", "bisect.py", "colorsys.py", "keyword.py",
             "fnmatch.py", "heapq.py", "shlex.py", "json/__init__.py", "json/decoder.py",
             "json/encoder.py", "json/scanner.py", "json/tool.py"]
    texts = []
    for name in names:
        path = os.path.join(stdlib, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    licenses = "/usr/share/common-licenses"
    if os.path.isdir(licenses):
        for name in sorted(os.listdir(licenses))[:3]:
            path = os.path.join(licenses, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts.append(f.read()[:20000])
    texts.append(EXTRA_DOC)
    assert len(texts) >= 8 and sum(map(len, texts)) > 50_000
    return texts


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    texts = _stdlib_texts()
    jsonl = d / "corpus.jsonl"
    _write_jsonl(jsonl, texts)
    return types.SimpleNamespace(dir=d, texts=texts, jsonl=str(jsonl))


@pytest.fixture(scope="module")
def byte_prefix(corpus):
    out = corpus.dir / "byte"
    rc = preprocess_data.main(["--input", corpus.jsonl, "--json-keys", "text",
                               "--output-prefix", str(out), "--tokenizer-type", "ByteLevelTokenizer",
                               "--append-eod", "--workers", "2"])
    assert rc == 0
    return str(out) + "_text_document"


def _args(**kw):
    base = dict(data_path=None, mock_data=False, tokenizer_type="ByteLevelTokenizer", tokenizer_model=None,
                vocab_file=None, merge_file=None, seq_length=32, seed=1234, micro_batch_size=2,
                global_batch_size=4, train_iters=6, eval_iters=1, eval_interval=3,
                split="80,20,0", vocab_size=None, data_cache_path=None,
                make_vocab_size_divisible_by=128, data_parallel_rank=0, data_parallel_size=1)
    base.update(kw)
    return types.SimpleNamespace(**base)


# --------------------------------------------------------------------------------------------
# preprocessing
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_byte_preprocess_roundtrip(corpus, byte_prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(byte_prefix)
    assert len(ds) == len(corpus.texts)
    assert ds.index.dtype == numpy.uint16
    eod = build_tokenizer(_args()).eod
    for i, text in enumerate(corpus.texts):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        assert bytes(ids[:-1]).decode("utf-8") == text  # byte-level: the ids are the UTF-8 bytes


@pytest.mark.unit
def test_null_tokenizer_preprocess(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    jsonl = tmp_path / "ids.jsonl"
    _write_jsonl(jsonl, ["1 2 3", "7 8", "", "99 0 5 5"], key="ids")
    rc = preprocess_data.main(["--input", str(jsonl), "--json-keys", "ids",
                               "--output-prefix", str(tmp_path / "n"),
                               "--tokenizer-type", "NullTokenizer", "--vocab-size", "100",
                               "--append-eod"])
    assert rc == 0
    ds = IndexedDataset(str(tmp_path / "n_ids_document"))
    docs = [ds[i].tolist() for i in range(len(ds))]
    assert docs == [[1, 2, 3, 100], [7, 8, 100], [99, 0, 5, 5, 100]]
    assert len(ds.document_indices) == 5  # 4 documents, one of them empty


@pytest.mark.unit
def test_preprocess_missing_input_clean_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "nope.jsonl"),
         "--output-prefix", str(tmp_path / "x"), "--tokenizer-type", "ByteLevelTokenizer"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "nope.jsonl" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_preprocess_bad_line_clean_error(tmp_path):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"other": "no text key"}\n')
    rc = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "b"),
                               "--tokenizer-type", "ByteLevelTokenizer"])
    assert rc == 2
    assert not (tmp_path / "b_text_document.bin").exists()


@pytest.mark.unit
@pytest.mark.parametrize("value,kind", [("null", "null"), ("123", "a number"), ('["a", "b"]', "an array"),
                                        ('{"a": "b"}', "an object")])
def test_preprocess_refuses_a_value_that_is_not_a_string(tmp_path, capsys, value, kind):
    """str() of the value would have made documents "None", "123", "['a', 'b']"."""
    jsonl = tmp_path / "values.jsonl"
    jsonl.write_text('{"text": "ok"}\n{"text": %s}\n' % value)
    rc = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "v"),
                               "--tokenizer-type", "ByteLevelTokenizer"])
    assert rc == 2
    assert f"{jsonl}:2: the value of 'text' is {kind}, not a string" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["values.jsonl"]


@pytest.mark.unit
@pytest.mark.parametrize("content", ["", "\n\n", '{"text": ""}\n'])
def test_preprocess_refuses_an_input_without_documents(tmp_path, capsys, content):
    """It wrote an index of no document, which training cannot open, and exited 0."""
    jsonl = tmp_path / "empty.jsonl"
    jsonl.write_text(content)
    rc = preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "e"),
                               "--tokenizer-type", "ByteLevelTokenizer", "--append-eod"])
    assert rc == 2
    assert f"{jsonl}: no document with text under 'text'" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]  # no .bin/.idx, no partial files


# --------------------------------------------------------------------------------------------
# checks and iterators
# --------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_check_data_paths(tmp_path, byte_prefix):
    sdata.check_data_paths(_args(data_path=[byte_prefix]))
    sdata.check_data_paths(_args(data_path=["0.3", byte_prefix, "0.7", byte_prefix]))
    sdata.check_data_paths(_args(mock_data=True))

    missing = str(tmp_path / "missing_text_document")
    with pytest.raises(ValueError, match="missing_text_document.bin"):
        sdata.check_data_paths(_args(data_path=["0.5", byte_prefix, "0.5", missing]))
    half = str(tmp_path / "half")
    shutil.copy(byte_prefix + ".bin", half + ".bin")
    with pytest.raises(ValueError, match=r"half\.idx"):
        sdata.check_data_paths(_args(data_path=[half]))

    vocab_file, merge_file = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_file.write_text("{}")
    merge_file.write_text("")
    sdata.check_data_paths(_args(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file),
                                 merge_file=str(merge_file), mock_data=True))
    with pytest.raises(ValueError, match="nowhere.txt"):
        sdata.check_data_paths(_args(tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab_file),
                                     merge_file=str(tmp_path / "nowhere.txt"), mock_data=True))
    with pytest.raises(ValueError, match="vocab-file"):
        sdata.check_data_paths(_args(tokenizer_type="GPT2BPETokenizer", merge_file=str(merge_file)))
    with pytest.raises(ValueError, match="tokenizer-model"):
        sdata.check_data_paths(_args(tokenizer_type="HuggingFaceTokenizer", mock_data=True))


def _first_batches(args, n=1, which=0):
    tok = build_tokenizer(args)
    its = sdata.build_data_iterators(args, tok)
    return [next(its[which]) for _ in range(n)]


def _check_batch(batch, args, vocab_size):
    b, s = args.micro_batch_size, args.seq_length
    assert set(batch) == {"tokens", "labels", "loss_mask", "position_ids"}
    for key, dtype in (("tokens", torch.int64), ("labels", torch.int64),
                       ("loss_mask", torch.float32), ("position_ids", torch.int64)):
        assert batch[key].shape == (b, s), key
        assert batch[key].dtype == dtype, key
        assert batch[key].device.type == "cpu"
    assert torch.equal(batch["labels"][:, :-1], batch["tokens"][:, 1:])
    assert torch.equal(batch["position_ids"], torch.arange(s).expand(b, s))
    assert int(batch["tokens"].min()) >= 0 and int(batch["tokens"].max()) < vocab_size


@pytest.mark.unit
def test_iterators_real_data(dist, corpus, byte_prefix, tmp_path):
    args = _args(data_path=[byte_prefix], data_cache_path=str(tmp_path / "cache"))
    tok = build_tokenizer(args)
    train_iter, valid_iter = sdata.build_data_iterators(args, tok)
    assert valid_iter is not None
    assert len(train_iter.dataset) >= args.train_iters * args.global_batch_size
    assert os.listdir(tmp_path / "cache")  # index cache went to data_cache_path
    full = "".join(corpus.texts)
    for it in (train_iter, valid_iter):
        for _ in range(3):
            batch = next(it)
            _check_batch(batch, args, tok.vocab_size)
            assert torch.all(batch["loss_mask"] == 1.0)
            for row, last in zip(batch["tokens"].tolist(), batch["labels"][:, -1].tolist()):
                # every eod-free piece of a sample is real text from the corpus
                pieces, cur = [], []
                for t in row + [last]:
                    if t == tok.eod:
                        pieces.append(cur)
                        cur = []
                    else:
                        cur.append(t)
                pieces.append(cur)
                for piece in pieces:
                    assert bytes(piece) in full.encode("utf-8")
    # consecutive batches differ, the iterator is infinite (wraps around)
    a, b = next(train_iter), next(train_iter)
    assert not torch.equal(a["tokens"], b["tokens"])
    for _ in range(len(train_iter.dataset)):
        next(train_iter)

    # default cache location: next to the data
    args2 = _args(data_path=[byte_prefix], eval_iters=0)
    train2, valid2 = sdata.build_data_iterators(args2, tok)
    assert valid2 is None
    assert os.path.isdir(os.path.join(os.path.dirname(byte_prefix), "cache"))
    assert torch.equal(next(train2)["tokens"], _first_batches(args)[0]["tokens"])


@pytest.mark.unit
def test_determinism_and_seed(dist, byte_prefix, tmp_path):
    def run(seed, cache):
        args = _args(data_path=[byte_prefix], seed=seed, data_cache_path=str(tmp_path / cache))
        return _first_batches(args, n=2)

    a, b = run(1234, "c1"), run(1234, "c2")
    for x, y in zip(a, b):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    c = run(4321, "c3")
    assert not torch.equal(a[0]["tokens"], c[0]["tokens"])


@pytest.mark.unit
def test_data_parallel_slices(dist, byte_prefix, tmp_path):
    cache = str(tmp_path / "cache")
    whole = _first_batches(_args(data_path=[byte_prefix], data_cache_path=cache), n=4)
    ranks = [
        _first_batches(_args(data_path=[byte_prefix], data_cache_path=cache,
                             data_parallel_rank=r, data_parallel_size=2), n=2)
        for r in range(2)
    ]
    # step k of rank r covers consumed samples [2k*mbs + r*mbs, ...) = dp1 batch 2k + r
    for k in range(2):
        for r in range(2):
            assert torch.equal(ranks[r][k]["tokens"], whole[2 * k + r]["tokens"])


@pytest.mark.unit
def test_weighted_blend(dist, byte_prefix, corpus, tmp_path):
    other = str(tmp_path / "copy_text_document")
    for ext in (".bin", ".idx"):
        shutil.copy(byte_prefix + ext, other + ext)
    args = _args(data_path=["0.3", byte_prefix, "0.7", other], data_cache_path=str(tmp_path / "c"))
    tok = build_tokenizer(args)
    train_iter, valid_iter = sdata.build_data_iterators(args, tok)
    from megatron.core.datasets.blended_dataset import BlendedDataset

    assert isinstance(train_iter.dataset, BlendedDataset)
    ids = numpy.asarray(train_iter.dataset.dataset_index)
    assert 0.15 < (ids == 0).mean() < 0.45
    _check_batch(next(train_iter), args, tok.vocab_size)
    _check_batch(next(valid_iter), args, tok.vocab_size)


@pytest.mark.unit
def test_tiny_valid_split_disables_eval(dist, tmp_path):
    jsonl = tmp_path / "t.jsonl"
    _write_jsonl(jsonl, ["abcdefghij" * 20] * 5)
    assert preprocess_data.main(["--input", str(jsonl), "--output-prefix", str(tmp_path / "t"),
                                 "--tokenizer-type", "ByteLevelTokenizer", "--append-eod"]) == 0
    args = _args(data_path=[str(tmp_path / "t_text_document")], split="969,30,1")
    with pytest.warns(UserWarning, match="valid split"):
        train_iter, valid_iter = sdata.build_data_iterators(args, build_tokenizer(args))
    assert valid_iter is None
    _check_batch(next(train_iter), args, 257)
    with pytest.raises(ValueError, match="train split"):
        bad = _args(data_path=[str(tmp_path / "t_text_document")], split="0.1,99.9,0")
        sdata.build_data_iterators(bad, build_tokenizer(bad))


@pytest.mark.unit
def test_mock_data(dist, tmp_path):
    for kw in (dict(mock_data=True), dict(data_path=None), dict(data_path=[]),
               dict(mock_data=True, data_path=[str(tmp_path / "does_not_exist")])):
        args = _args(**kw)
        tok = build_tokenizer(args)
        train_iter, valid_iter = sdata.build_data_iterators(args, tok)
        for it in (train_iter, valid_iter):
            batch = next(it)
            _check_batch(batch, args, tok.vocab_size)
    null_args = _args(mock_data=True, tokenizer_type="NullTokenizer", vocab_size=1000,
                      micro_batch_size=3, seq_length=16)
    tok = build_tokenizer(null_args)
    batch = _first_batches(null_args)[0]
    _check_batch(batch, null_args, tok.vocab_size)


# --------------------------------------------------------------------------------------------
# data checks (check_data): before the model is built, one line through pretrain_gpt.py
# --------------------------------------------------------------------------------------------


def _write_index(prefix, documents, dtype=numpy.uint16):
    """A .bin/.idx pair of these documents (lists of ids), written by megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for ids in documents:
        builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
    builder.finalize(prefix + ".idx")
    return prefix


def _bad_data(case, d, good):
    """(args for _args, the message) for one way the data can be wrong; `good` is a byte-level prefix."""
    bad = str(d / "bad_text_document")
    if case == "truncated .bin":
        shutil.copy(good + ".idx", bad + ".idx")
        with open(good + ".bin", "rb") as src, open(bad + ".bin", "wb") as dst:
            data = src.read()
            dst.write(data[:len(data) // 2])
        return dict(data_path=[bad]), (f"{bad}.bin has {len(data) // 2} bytes, but {bad}.idx describes "
                                       f"{len(data)} bytes: a truncated .bin, or an .idx of another corpus")
    if case == ".idx of another corpus":
        _write_index(str(d / "other"), [[1, 2, 3], [4, 5]])
        shutil.copy(good + ".bin", bad + ".bin")
        shutil.copy(str(d / "other.idx"), bad + ".idx")
        return dict(data_path=[bad]), f"{bad}.idx describes 10 bytes: an .idx of another corpus"
    if case == "ids beyond the vocabulary":  # byte-level data (eod 256) read with 101 ids
        return (dict(data_path=[good], tokenizer_type="NullTokenizer", vocab_size=100),
                f"{good}.bin holds token id 256, but the NullTokenizer vocabulary has 101 ids (0..100): the data "
                f"was tokenized with another tokenizer; give that one with --tokenizer-type and --vocab-size")
    if case == "--split abc":
        return dict(data_path=[good], split="abc"), "--split 'abc': give the train,valid,test parts"
    assert case == "empty dataset"
    _write_index(bad, [])
    return dict(data_path=[bad]), f"{bad}.idx: the dataset is empty"


BAD_DATA = ["truncated .bin", ".idx of another corpus", "ids beyond the vocabulary", "--split abc", "empty dataset"]


@pytest.mark.unit
@pytest.mark.parametrize("case", BAD_DATA)
def test_check_data_refuses_bad_data(tmp_path, byte_prefix, case):
    kw, message = _bad_data(case, tmp_path, byte_prefix)
    args = _args(**kw, data_cache_path=str(tmp_path / "cache"))
    with pytest.raises(ValueError) as refused:
        sdata.check_data(args, build_tokenizer(args))
    assert message in str(refused.value)
    sdata.check_data(_args(data_path=[byte_prefix]), build_tokenizer(_args()))  # the good data passes


@pytest.mark.unit
def test_ids_below_the_padded_vocabulary_are_refused_too(tmp_path):
    """Ids 0..100 with a 51-id vocabulary fit the padded embedding (128 rows): no crash, but dummy rows
    would be trained. The largest id is computed once and kept in the cache directory."""
    prefix = _write_index(str(tmp_path / "ids"), [[1, 2, 99, 100], [7, 100]])
    cache = tmp_path / "cache"
    small = _args(data_path=[prefix], tokenizer_type="NullTokenizer", vocab_size=50, data_cache_path=str(cache))
    with pytest.raises(ValueError, match="holds token id 100, but the NullTokenizer vocabulary has 51 ids"):
        sdata.check_data(small, build_tokenizer(small))
    fits = _args(data_path=[prefix], tokenizer_type="NullTokenizer", vocab_size=100, data_cache_path=str(cache))
    sdata.check_data(fits, build_tokenizer(fits))

    [record] = cache.glob("ids.bin-*.max_token_id")
    assert record.read_text() == "100"
    record.write_text("7")  # the record is what a later run reads, instead of the .bin
    sdata.check_data(small, build_tokenizer(small))
    os.utime(prefix + ".bin", ns=(0, 0))  # a changed .bin is scanned again
    with pytest.raises(ValueError, match="holds token id 100"):
        sdata.check_data(small, build_tokenizer(small))


@pytest.mark.unit
@pytest.mark.parametrize("split,message", [
    ("abc", "give the train,valid,test parts"), ("-1,0,0", "give the train,valid,test parts"),
    ("1,2,3,4", "give the train,valid,test parts"), ("1e-3,1,0", "give the train,valid,test parts"),
    ("0,0,0", "all parts are zero"), ("0,100,0", "leaves no training data"),
])
def test_check_data_refuses_bad_splits(byte_prefix, split, message):
    args = _args(data_path=[byte_prefix], split=split)
    with pytest.raises(ValueError, match=message):
        sdata.check_data(args, build_tokenizer(args))
    for good in ("969,30,1", "99, 1", "100", "0.8,.2"):
        args = _args(data_path=[byte_prefix], split=good)
        sdata.check_data(args, build_tokenizer(args))


@pytest.mark.integration
@pytest.mark.parametrize("case", BAD_DATA)
def test_pretrain_gpt_refuses_bad_data_in_one_line(tmp_path, byte_prefix, case):
    kw, message = _bad_data(case, tmp_path, byte_prefix)
    flags = ["--data-path", *kw["data_path"], "--split", kw.get("split", "100,0,0"),
             "--tokenizer-type", kw.get("tokenizer_type", "ByteLevelTokenizer")]
    if "vocab_size" in kw:
        flags += ["--vocab-size", str(kw["vocab_size"])]
    proc = subprocess.run(
        [sys.executable, "pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
         "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size",
         "2", "--train-iters", "2", "--lr", "1e-4", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "total parameters" not in proc.stdout  # before the model
