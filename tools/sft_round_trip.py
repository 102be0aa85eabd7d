"""The fine-tuning path end to end on a GPU machine, nothing downloaded (tools/gpu_campaign.sh sft):
a Llama-3-8B-shaped Hugging Face model with random weights and a chat tokenizer, made here; then
`convert_hf.py import`, `examples/run.sh -m stronghold -- --sft` (packed, and padded), `convert_hf.py
export`, and transformers' loss on the held-out conversation of the exported model.

    python tools/sft_round_trip.py make  --out DIR [--layers 32] [--hidden 4096]
                                                   DIR/hf (model, tokenizer), DIR/chat.jsonl
    python tools/sft_round_trip.py timed -- CMD...                   runs CMD; prints its wall time and peak RSS
    python tools/sft_round_trip.py score --hf DIR --data FILE        transformers' loss on the file's last conversation
    python tools/sft_round_trip.py rates FILE                         conversation tokens/s of the packed and
                                                                      padded runs in FILE (the stage's sft.txt)

chat.jsonl holds TRAIN random-word conversations of Zipf-like lengths (as chat data has: many short
ones, a few long), then HELD_OUT copies of one more. `--split TRAIN,HELD_OUT,0` makes those copies the
validation split, so the run's validation loss is the loss of that one conversation, which transformers
then computes on the exported model.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

TRAIN, HELD_OUT = 1500, 40
SPECIAL = ["<unk>", "<pad>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
           "system", "user", "assistant"]
# Llama 3's layout, with {% generation %} blocks marking what the assistant says.
TEMPLATE = ("<|begin_of_text|> {% for m in messages %}<|start_header_id|> {{ m['role'] }} <|end_header_id|> "
            "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }} <|eot_id|>{% endgeneration %}"
            "{% else %}{{ m['content'] }} <|eot_id|>{% endif %} {% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|> assistant <|end_header_id|> {% endif %}")


def make(ns) -> None:
    import numpy
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab_size = 128256
    words = SPECIAL + [f"w{i}" for i in range(vocab_size - len(SPECIAL))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                                     eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    tokenizer.chat_template = TEMPLATE
    hf = os.path.join(ns.out, "hf")
    tokenizer.save_pretrained(hf)

    heads = max(1, ns.hidden // 128)  # Llama 3 8B's proportions at any --hidden (a CPU check runs it small)
    config = transformers.LlamaConfig(
        num_hidden_layers=ns.layers, hidden_size=ns.hidden, intermediate_size=ns.hidden * 7 // 2,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab_size, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=5, pad_token_id=1, dtype="bfloat16")
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(hf)
    params = sum(p.numel() for p in model.parameters())
    print(f"made {hf}: {ns.layers} layers, {params / 1e9:.2f} B parameters, bf16, "
          f"{time.perf_counter() - start:.0f} s", flush=True)

    rng = numpy.random.default_rng(0)

    def text(mean_words):
        n = int(min(1500, max(4, rng.zipf(1.6) * mean_words / 6)))
        return " ".join(f"w{i}" for i in rng.integers(0, 2000, n))  # a small working vocabulary: learnable

    def conversation():
        messages = [{"role": "system", "content": text(20)}]
        for _ in range(int(rng.integers(1, 4))):
            messages += [{"role": "user", "content": text(60)}, {"role": "assistant", "content": text(120)}]
        return {"messages": messages}

    held_out = conversation()
    with open(os.path.join(ns.out, "chat.jsonl"), "w") as f:
        for record in [conversation() for _ in range(TRAIN)] + [held_out] * HELD_OUT:
            f.write(json.dumps(record) + "\n")
    print(f"wrote {ns.out}/chat.jsonl: {TRAIN} conversations, then {HELD_OUT} copies of the held-out one "
          f"(--split {TRAIN},{HELD_OUT},0)", flush=True)


def timed(ns) -> int:
    start = time.perf_counter()
    status = subprocess.call(ns.command)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
    print(f"timed: {' '.join(ns.command[:3])} ...: {time.perf_counter() - start:.0f} s, peak host RSS {peak:.1f} GiB, "
          f"exit {status}", flush=True)
    return status


def score(ns) -> None:
    import torch
    import transformers

    with open(ns.data) as f:
        messages = json.loads(f.readlines()[-1])["messages"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(ns.hf)
    rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                             return_assistant_tokens_mask=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(ns.hf, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor([rendered["input_ids"]], device=device)
    labels = ids.clone()
    labels[0, torch.tensor(rendered["assistant_masks"], device=device) == 0] = -100
    with torch.no_grad():
        loss = float(model(ids, labels=labels).loss)
    print(f"transformers loss on the held-out conversation ({ids.shape[1]} tokens) of {ns.hf}: {loss:.6f}", flush=True)


def rates(ns) -> None:
    """Per run (a line prefix): the training sequences' share of conversation tokens (the "> sft train:
    N sequences" line) times the tokens of a step over the mean time of the iterations after the first."""
    import re

    text = open(ns.file).read()
    for run in ("packed", "padded"):
        share = re.search(rf"^{run} > sft train: \d+ sequences of (\d+) tokens .*?, (\d+)% of them conversation",
                          text, re.M)
        steps = re.findall(rf"^{run} +iteration +(\d+)/.*?elapsed time per iteration \(ms\): ([\d.]+)"
                           rf".*?global batch size: +(\d+).*?TFLOP/s per GPU: ([\d.]+)", text, re.M)
        steps = [s for s in steps if int(s[0]) > 1]
        if not share or not steps:
            print(f"{run}: no sequences line or no iteration after the first in {ns.file}")
            continue
        ms = sum(float(s[1]) for s in steps) / len(steps)
        tokens = int(steps[0][2]) * (int(share.group(1)) - 1)
        useful = tokens * int(share.group(2)) / 100
        print(f"{run}: {ms:.0f} ms per iteration, {tokens / ms * 1e3:,.0f} tokens/s of which conversation "
              f"{useful / ms * 1e3:,.0f} ({share.group(2)}%), TFLOP/s per GPU "
              f"{sum(float(s[3]) for s in steps) / len(steps):.0f} (padding counted)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command_name", required=True)
    m = sub.add_parser("make")
    m.add_argument("--out", required=True)
    m.add_argument("--layers", type=int, default=32)
    m.add_argument("--hidden", type=int, default=4096)
    t = sub.add_parser("timed")
    t.add_argument("command", nargs=argparse.REMAINDER)
    s = sub.add_parser("score")
    s.add_argument("--hf", required=True)
    s.add_argument("--data", required=True)
    r = sub.add_parser("rates")
    r.add_argument("file")
    ns = p.parse_args()
    if ns.command_name == "timed":
        ns.command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
        return timed(ns)
    {"make": make, "score": score, "rates": rates}[ns.command_name](ns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
