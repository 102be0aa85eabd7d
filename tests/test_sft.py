"""--sft: chat conversations rendered with a tiny Hugging Face tokenizer's own chat template (made here,
nothing downloaded), loss on the assistant's tokens only."""

import json

import pytest
import torch

from megatron.stronghold import arguments, sft, training

pytestmark = pytest.mark.unit

WORDS = ["hello", "hi", "there", "how", "are", "you", "fine", "thanks", "be", "brief", "ok", "bye"]
SPECIAL = ["[UNK]", "<pad>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# The same rendering with and without {% generation %} blocks.
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['role'] == 'assistant' %}{% generation %}"
            "{{ m['content'] }} <|end|>{% endgeneration %}{% else %}{{ m['content'] }} <|end|>{% endif %} "
            "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
PLAIN_TEMPLATE = TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello how are you"},
        {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye"}]


def tokenizer_dir(path, template, words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>")
    hf.chat_template = template
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return {"generation": tokenizer_dir(d / "generation", TEMPLATE), "plain": tokenizer_dir(d / "plain", PLAIN_TEMPLATE),
            "none": tokenizer_dir(d / "none", None)}


def renderer(directory):
    from transformers import AutoTokenizer
    return sft.ChatRenderer(AutoTokenizer.from_pretrained(directory), directory)


@pytest.mark.parametrize("kind", ["generation", "plain"])
def test_the_loss_covers_exactly_the_assistants_tokens(tokenizers, kind):
    r = renderer(tokenizers[kind])
    assert r.generation_blocks == (kind == "generation")
    ids, mask = r.render(CHAT)
    tok = r.tokenizer
    marked = tok.convert_ids_to_tokens([i for i, m in zip(ids, mask) if m])
    assert marked == ["fine", "thanks", "<|end|>", "bye", "<|end|>"]
    assert len(ids) == len(mask) and tok.convert_ids_to_tokens(ids)[:3] == ["<|system|>", "be", "brief"]


def test_both_ways_of_finding_the_assistants_tokens_agree(tokenizers):
    assert renderer(tokenizers["generation"]).render(CHAT) == renderer(tokenizers["plain"]).render(CHAT)


def test_sequences_are_padded_without_loss_and_positions_start_at_zero(tokenizers):
    r = renderer(tokenizers["generation"])
    samples, truncated, dropped = sft.fit([r.render(c) for c in (CHAT, CHAT[:3])], seq_length=24)
    ds = sft.SFTDataset([[s] for s in samples], 24, pad_id=1)
    ids, mask = r.render(CHAT[:3])
    item = ds[1]
    assert (truncated, dropped) == (0, 0) and list(item["position_ids"]) == list(range(24))
    assert list(item["tokens"][:len(ids)]) == ids and set(item["tokens"][len(ids):]) == {1}
    # position t predicts token t + 1, which counts where the assistant said it; padding never counts
    assert list(item["loss_mask"]) == mask[1:] + [0.0] * (24 - len(ids) + 1)
    assert list(item["labels"][:len(ids) - 1]) == ids[1:]


def test_packed_conversations_restart_positions_and_carry_their_number(tokenizers):
    r = renderer(tokenizers["generation"])
    (a, am), (b, bm) = sft.fit([r.render(CHAT[:3])] * 2, seq_length=24)[0]
    sequences = sft.pack([(a, am), (b, bm), (a, am)], seq_length=2 * len(a) - 1)
    assert [len(s) for s in sequences] == [2, 1]
    item = sft.SFTDataset(sequences, 2 * len(a) - 1, pad_id=1, segments=True)[0]
    n = len(a)
    assert list(item["tokens"]) == list(a) + list(b[:-1])
    assert list(item["position_ids"]) == list(range(n)) + list(range(n - 1))
    assert list(item["segments"]) == [0] * n + [1] * (n - 1)
    # the last token of the first conversation does not predict the second's first token
    assert list(item["loss_mask"]) == list(am[1:]) + [0.0] + list(bm[1:])


def test_a_packed_conversation_sees_only_itself(tokenizers, tmp_path):
    """The per-token losses of a conversation packed after another equal its losses alone, with rotary
    and with learned positions; without the conversation mask they would not."""
    from megatron.stronghold import distributed, model as model_lib

    distributed.init_distributed(torch.device("cpu"))
    r = renderer(tokenizers["generation"])
    (a, am), (b, bm) = sft.fit([r.render(CHAT), r.render(CHAT[1:3])], seq_length=48)[0]
    packed = sft.SFTDataset([[(a, am), (b, bm)]], 48, pad_id=1, segments=True)[0]
    alone = sft.SFTDataset([[(b, bm)]], 48, pad_id=1, segments=True)[0]
    for positions in ("rope", "learned_absolute"):
        argv = [*FLAGS, "--seq-length", "48", "--max-position-embeddings", "48", "--position-embedding-type",
                positions, "--train-iters", "2", "--data-path", "x.jsonl"]
        torch.manual_seed(0)
        model = model_lib.build_model(arguments.parse_args(argv), vocab_size=32).eval()

        def losses(item, segments=True):
            batch = {k: torch.as_tensor(v)[None] for k, v in item.items()}
            with torch.no_grad():
                return model(batch["tokens"], batch["position_ids"], batch["segments"] if segments else None,
                             labels=batch["labels"])[0]

        n = len(a)
        together, by_itself = losses(packed)[n:n + len(b) - 1], losses(alone)[:len(b) - 1]
        torch.testing.assert_close(together, by_itself, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(losses(packed, segments=False)[n:n + len(b) - 1], by_itself, rtol=1e-3)


def test_long_conversations_are_cut_and_those_left_without_an_answer_dropped(tokenizers):
    r = renderer(tokenizers["generation"])
    samples, truncated, dropped = sft.fit([r.render(CHAT)] * 2, seq_length=12)  # 12 + 1 tokens: the first answer
    assert (len(samples), truncated, dropped) == (2, 2, 0) and len(samples[0][0]) == 13
    samples, truncated, dropped = sft.fit([r.render(CHAT)], seq_length=6)  # the system and user turns only
    assert (len(samples), truncated, dropped) == (0, 1, 1)


def write_jsonl(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "24",
         "--max-position-embeddings", "24", "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "3e-3",
         "--min-lr", "3e-4", "--lr-warmup-iters", "1", "--seed", "7", "--sft", "--tokenizer-type",
         "HuggingFaceTokenizer", "--split", "1,0,0"]


@pytest.mark.unit
def test_the_attention_check_tool_holds_each_kernel_to_fp32_attention(capsys, monkeypatch):
    """tools/attention_check.py (run by the GPU's fine-tuning stage): on the CPU every kernel that runs and
    layout equals fp32 attention, and every row reports the output and, with autograd, the three gradients."""
    import importlib.util
    import os
    import sys

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "attention_check.py")
    spec = importlib.util.spec_from_file_location("attention_check", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    monkeypatch.setattr(sys, "argv", ["attention_check.py", "--seq", "48", "--heads", "4", "--groups", "2", "--dim", "8"])
    assert tool.main() == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 * 5 * 2 * 2  # masks x (torch's choice and 4 backends) x layouts x autograd off and on
    ran = [row for row in rows if not row.rstrip().endswith("-")]
    # a CPU has flash and math (torch's choice among them) and neither cuDNN nor memory-efficient attention
    assert {row[22:40].strip() for row in ran} == {"torch: flash", "flash", "math"} and len(ran) == 2 * 3 * 2 * 2
    errors = [float(cell) for row in ran for cell in row[66:].split()]
    assert len(errors) == len(ran) // 2 * (1 + 4) and max(errors) < 1e-5


@pytest.mark.parametrize("line, message", [
    (b"{not json", "not a JSON object"),
    ({"text": "hello"}, 'no "messages" list'),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "message 0 has role 'bot'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "the conversation has no assistant message"),
    (b'{"messages": [{"role": "assistant", "content": "\xff"}]}', "not UTF-8 text"),
])
def test_bad_conversations_stop_with_file_and_line(tokenizers, tmp_path, capsys, line, message):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, line])
    status = training.main([*FLAGS, "--train-iters", "2", "--data-path", data,
                            "--tokenizer-model", tokenizers["generation"]])
    err = capsys.readouterr().err
    assert status == 2 and f"error: {data}:2: {message}" in err and "Traceback" not in err


def test_a_missing_source_is_named(tokenizers, tmp_path, capsys):
    missing = str(tmp_path / "chat")
    status = training.main([*FLAGS, "--train-iters", "2", "--data-path", missing,
                            "--tokenizer-model", tokenizers["generation"]])
    err = capsys.readouterr().err
    assert status == 2 and f"{missing} is neither a JSONL file nor the prefix" in err and "Traceback" not in err


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizers, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}])
    status = training.main([*FLAGS, "--train-iters", "2", "--data-path", data, "--tokenizer-model", tokenizers["none"]])
    assert status == 2 and "has no chat template" in capsys.readouterr().err


def conversations(n):
    chats = [CHAT, CHAT[:3], [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello ok"}]]
    return [{"messages": chats[i % len(chats)]} for i in range(n)]


@pytest.mark.parametrize("method, extra", [("stronghold", ("--resident-layers", "0")), ("l2l", ()), ("zero-offload", ()),
                                           ("zero-infinity", ())])
def test_streamed_methods_fine_tune_like_megatron(tokenizers, tmp_path, method, extra):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))

    def run(m, *more):
        argv = [*FLAGS, "--train-iters", "6", "--data-path", data, "--tokenizer-model", tokenizers["generation"],
                "--offload-method", m, *more]
        return training.train(arguments.parse_args(argv))

    reference, got = run("megatron-lm"), run(method, *extra)
    assert got.losses == pytest.approx(reference.losses, rel=1e-5)
    assert all(torch.isfinite(torch.tensor(reference.losses)))


def test_the_mask_counts_the_answer_whatever_the_prompts_length(tokenizers):
    """Prompts of 1 and 5 words before the same answer: 3 tokens carry loss in both ("hello ok <|end|>")."""
    r = renderer(tokenizers["generation"])
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ok"}]
    long = [{"role": "user", "content": "hello how are you there"}, {"role": "assistant", "content": "hello ok"}]
    (a, _, _), (b, _, _) = sft.fit([r.render(short)], 24), sft.fit([r.render(long)], 24)
    ds_a, ds_b = sft.SFTDataset([a], 24, 1), sft.SFTDataset([b], 24, 1)
    assert ds_a[0]["loss_mask"].sum() == ds_b[0]["loss_mask"].sum() == 3  # "hello ok <|end|>"


def test_the_trainer_takes_the_loss_over_the_mask_and_logs_the_data(tokenizers, tmp_path, capsys, monkeypatch):
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(8))
    argv = [*FLAGS, "--split", "3,1,0", "--eval-iters", "1", "--eval-interval", "2", "--train-iters", "2",
            "--data-path", data,
            "--tokenizer-model", tokenizers["generation"]]
    masked = training.train(arguments.parse_args(argv))
    out = capsys.readouterr().out
    assert "> sft train: 6 conversations, 0 cut at --seq-length 24, 0 dropped" in out
    assert "> sft valid: 2 conversations" in out and "{% generation %} blocks" in out
    item = sft.SFTDataset.__getitem__

    def every_token(self, i):  # the loss over every real token, prompts included
        d = item(self, i)
        d["loss_mask"] = (d["labels"] != self.pad_id).astype("float32")
        return d
    monkeypatch.setattr(sft.SFTDataset, "__getitem__", every_token)
    assert training.train(arguments.parse_args(argv)).losses[0] != masked.losses[0]



def preprocess(*argv):
    import importlib
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
    return importlib.import_module("preprocess_data").main(list(argv))


def test_preprocessed_conversations_train_as_the_jsonl_does(tokenizers, tmp_path, capsys):
    """tools/preprocess_data.py --sft (two workers) renders once; training on its files gives the losses
    training on the JSONL gives."""
    data = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    assert preprocess("--input", data, "--sft", "--output-prefix", str(tmp_path / "chat"), "--workers", "2",
                      "--tokenizer-model", tokenizers["generation"]) == 0
    assert "Done: 12 documents" in capsys.readouterr().err

    def run(path):
        argv = [*FLAGS, "--train-iters", "3", "--data-path", path, "--tokenizer-model", tokenizers["generation"]]
        return training.train(arguments.parse_args(argv)).losses

    assert run(str(tmp_path / "chat_sft")) == run(data)


def test_preprocess_refuses_a_bad_conversation_with_its_line(tokenizers, tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": [{"role": "user", "content": "hi"}]}])
    assert preprocess("--input", data, "--sft", "--output-prefix", str(tmp_path / "chat"),
                      "--tokenizer-model", tokenizers["generation"]) == 2
    assert f"{data}:2: the conversation has no assistant message" in capsys.readouterr().err
    assert not list(tmp_path.glob("chat_sft*"))


def test_weighted_files_blend_in_their_proportions(tokenizers, tmp_path):
    """--data-path 0.75 A 0.25 B: of the first 8 training sequences 6 are A's and 2 B's, each file's in
    its own order, as megatron-core blends pre-training data."""
    from transformers import AutoTokenizer

    short = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello ok"}]
    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}] * 4)
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": short}] * 4)
    argv = [*FLAGS, "--no-sft-packing", "--train-iters", "2", "--data-path", "0.75", a, "0.25", b,
            "--tokenizer-model", tokenizers["generation"]]
    args = arguments.parse_args(argv)
    from megatron.stronghold.tokenizer import build_tokenizer
    train, _ = sft.build_datasets(args, build_tokenizer(args))
    r = renderer(tokenizers["generation"])
    long, brief = len(r.render(CHAT)[0]), len(r.render(short)[0])
    lengths = [int((train[i]["labels"] != 1).sum()) + 1 for i in range(len(train))]  # pad id 1
    assert len(train) == 8 and lengths.count(long) == 6 and lengths.count(brief) == 2


def random_word_chats(directory, path, n, words=200, answer=24, seed=0):
    """A chat tokenizer over `words` words (WordLevel, the test's template) and n conversations whose
    every word is drawn uniformly: no causal model can score the answers' words below ln(words)."""
    import random

    tokenizer = tokenizer_dir(directory, TEMPLATE, [f"w{i}" for i in range(words)])
    rng = random.Random(seed)

    def text(k):
        return " ".join(f"w{rng.randrange(words)}" for _ in range(k))
    chats = [{"messages": [{"role": "user", "content": text(rng.randrange(2, 12))},
                           {"role": "assistant", "content": text(answer)}]} for _ in range(n)]
    return tokenizer, write_jsonl(path, chats)


def sft_losses_respect_causality(tmp_path, packing, iters=150, extra=()):
    """Trained on random-word chats, fresh data every step: the training and validation losses stay above
    the answers' floor (24 of 25 loss tokens uniform over 200 words: 24/25 ln 200) and agree. Attention
    that sees the future only while training (the step's path, not evaluation's) parts the two within 100
    iterations, packed or padded; attention that sees it everywhere beats the floor when packed (checked
    by patching SDPA, 2026-12-07). A run on a GPU logged padded training losses below such a floor."""
    import math

    tokenizer, data = random_word_chats(tmp_path / "tok", tmp_path / "chat.jsonl", 40 * iters)
    argv = ["--num-layers", "2", "--hidden-size", "128", "--num-attention-heads", "4", "--group-query-attention",
            "--num-query-groups", "2", "--position-embedding-type", "rope", "--seq-length", "64",
            "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "16",
            "--lr", "1e-2", "--min-lr", "1e-3", "--lr-warmup-iters", "2", "--seed", "3", "--train-iters", str(iters),
            "--eval-interval", str(iters // 3), "--eval-iters", "4", "--split", "9,1,0", "--log-interval", "10", "--sft",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer, "--data-path", data,
            *([] if packing else ["--no-sft-packing"]), *extra]
    history = training.train(arguments.parse_args(argv))
    floor = 24 / 25 * math.log(200)
    for it, valid in history.valid_losses:
        train = sum(history.losses[it - 3:it]) / 3
        assert valid > floor - 0.1 and train > floor - 0.1, (it, train, valid, floor)
        assert abs(train - valid) < 0.25, (it, train, valid)
    return history


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sft_training_and_validation_losses_respect_causality(tmp_path, packing):
    sft_losses_respect_causality(tmp_path, packing)
