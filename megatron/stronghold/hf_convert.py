"""This trainer's checkpoints as Hugging Face transformers models, and back (tools/convert_hf.py).

Which transformers class a model becomes follows from the flags it was trained with (recorded in
the checkpoint's "args"):

    GPT2LMHeadModel   the default layer: LayerNorm, GELU (exact erf form, or tanh with
                      --openai-gelu), learned positions, biases, one key/value head per query head
    LlamaForCausalLM  --normalization RMSNorm --swiglu --position-embedding-type rope, any
                      --group-query-attention / --kv-channels, biases on or --disable-bias-linear
    Qwen2ForCausalLM  the same with --disable-bias-linear --add-qkv-bias
    Qwen3ForCausalLM  the same with --qk-layernorm --disable-bias-linear

Anything else has no transformers class that computes the same function, and is refused
(Unsupported: a message, exit status 2).

Layouts:
- megatron-core's fused attention projection `linear_qkv` holds, for each of the g query groups in
  turn, the group's n/g query heads, then its key head, then its value head (d = --kv-channels rows
  each); transformers keeps queries, keys and values apart (q_proj, k_proj, v_proj) or, in GPT-2's
  c_attn, side by side (all query heads, all key heads, all value heads);
- GPT-2's linear layers are Conv1D, whose weight is stored [in, out]: the transpose of nn.Linear's;
- SwiGLU's `linear_fc1` is [gate; up] (the first half goes through SiLU): gate_proj and up_proj;
- the vocabulary: Megatron pads the embedding to --make-vocab-size-divisible-by. Export writes the
  tokenizer's rows only (the logits of real token ids are unchanged; padded ids never occur), or
  all rows for a checkpoint that does not record the tokenizer's size. Import picks the divisor
  that pads the tokenizer's vocabulary to exactly transformers' vocab_size, so no row is added
  and the loss is the same.

Memory: checkpoints are memory-mapped and each output tensor is made on its own, so a conversion
holds at most one shard of the output (plus pages of the input the kernel may drop) at a time.
"""

import json
import os
import shutil
from dataclasses import dataclass, fields

import torch

from .errors import first_line
from .layer_shape import LayerShape
from .tokenizer import padded_vocab_size


class Unsupported(ValueError):
    """The model cannot be converted (a message for the user, exit status 2)."""


# ----- the model a checkpoint holds -----

@dataclass(frozen=True)
class ModelSpec:
    """The flags that define a model, with Megatron-LM's defaults for those an old checkpoint lacks."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    kv_channels: int
    max_position_embeddings: int
    padded_vocab_size: int
    vocab_rows: int                 # rows exported: the tokenizer's vocabulary (padded_vocab_size if unknown)
    untie_embeddings_and_output_weights: bool = False
    normalization: str = "LayerNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = False
    openai_gelu: bool = False
    disable_bias_linear: bool = False
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    position_embedding_type: str = "learned_absolute"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    eod_token_id: int | None = None

    @classmethod
    def from_checkpoint(cls, state: dict) -> tuple["ModelSpec", list]:
        """The spec of a checkpoint ("args", checkpointing.MODEL_ARGS) and notes for the user on
        what it had to assume for a checkpoint written before those were all recorded."""
        from .checkpointing import saved_shape

        notes = []
        recorded = {k: v for k, v in state.get("args", {}).items() if v is not None}
        if "normalization" not in recorded:
            notes.append("the checkpoint predates the layer flags: it holds Megatron-LM's default GPT layer "
                         "(LayerNorm, GELU, learned positions, biases)")
        saved = saved_shape(recorded)
        if "unpadded_vocab_size" not in saved:
            notes.append("the checkpoint does not record its tokenizer's vocabulary size: exporting all "
                         f"{saved['padded_vocab_size']} rows of the padded vocabulary")
        saved["vocab_rows"] = saved.get("unpadded_vocab_size") or saved["padded_vocab_size"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names}), notes

    @property
    def linear_bias(self) -> bool:
        return LayerShape.of(self).linear_bias

    @property
    def qkv_bias(self) -> bool:
        return LayerShape.of(self).qkv_bias


def _flags_of(spec: ModelSpec) -> str:
    parts = [f"--normalization {spec.normalization}", "--swiglu" if spec.swiglu else "GELU",
             f"--position-embedding-type {spec.position_embedding_type}"]
    if spec.disable_bias_linear:
        parts.append("--disable-bias-linear")
    if spec.add_qkv_bias:
        parts.append("--add-qkv-bias")
    if spec.qk_layernorm:
        parts.append("--qk-layernorm")
    return " ".join(parts)


EXPORTABLE = ("transformers has classes for: the default GPT layer (GPT2LMHeadModel); --normalization RMSNorm "
              "--swiglu --position-embedding-type rope with biases or --disable-bias-linear (LlamaForCausalLM), "
              "with --disable-bias-linear --add-qkv-bias (Qwen2ForCausalLM), with --qk-layernorm "
              "--disable-bias-linear (Qwen3ForCausalLM)")


def hf_architecture(spec: ModelSpec) -> str:
    """The transformers class that computes what the checkpoint's model computes, or Unsupported."""
    problems = []
    if spec.position_embedding_type == "learned_absolute":
        arch = "GPT2LMHeadModel"
        if spec.normalization != "LayerNorm":
            problems.append(f"it needs LayerNorm, not --normalization {spec.normalization}")
        if spec.swiglu:
            problems.append("it has no SwiGLU MLP")
        if not spec.linear_bias:
            problems.append("it has biases in every linear layer (no --disable-bias-linear)")
        if spec.qk_layernorm:
            problems.append("it has no --qk-layernorm")
        if spec.num_query_groups != spec.num_attention_heads:
            problems.append("it has one key/value head per query head (no --group-query-attention)")
        if spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
            problems.append("its heads are --hidden-size / --num-attention-heads wide (no other --kv-channels)")
    else:
        if spec.normalization != "RMSNorm":
            problems.append(f"it needs RMSNorm, not --normalization {spec.normalization}")
        if not spec.swiglu:
            problems.append("it needs a --swiglu MLP")
        if spec.rotary_percent != 1.0:
            problems.append(f"it rotates every channel of a head (--rotary-percent 1, not {spec.rotary_percent})")
        if spec.hidden_size % spec.num_attention_heads:
            problems.append("it needs --hidden-size divisible by --num-attention-heads")
        if spec.qk_layernorm:
            arch = "Qwen3ForCausalLM"
            if spec.qkv_bias:
                problems.append("it has --qk-layernorm with --disable-bias-linear and no --add-qkv-bias")
        elif spec.linear_bias == spec.qkv_bias:
            arch = "LlamaForCausalLM"
        else:
            arch = "Qwen2ForCausalLM"
            if spec.kv_channels * spec.num_attention_heads != spec.hidden_size:
                problems.append("its heads are --hidden-size / --num-attention-heads wide (no other --kv-channels)")
    if problems:
        raise Unsupported(f"cannot export this model ({_flags_of(spec)}): the nearest transformers class, "
                          f"{arch}, computes something else: " + "; ".join(problems) + f". {EXPORTABLE}.")
    return arch


def hf_config(spec: ModelSpec, arch: str, dtype: torch.dtype):
    """The transformers config of the checkpoint's model."""
    import transformers

    common = dict(vocab_size=spec.vocab_rows, tie_word_embeddings=not spec.untie_embeddings_and_output_weights,
                  bos_token_id=spec.eod_token_id, eos_token_id=spec.eod_token_id, architectures=[arch],
                  dtype=str(dtype).removeprefix("torch."))
    if arch == "GPT2LMHeadModel":
        return transformers.GPT2Config(
            n_layer=spec.num_layers, n_embd=spec.hidden_size, n_head=spec.num_attention_heads,
            n_inner=spec.ffn_hidden_size, n_positions=spec.max_position_embeddings,
            # "gelu" is torch's exact GELU (megatron-core's default); "gelu_new" GPT-2's tanh form
            activation_function="gelu_new" if spec.openai_gelu else "gelu",
            layer_norm_epsilon=spec.norm_epsilon, resid_pdrop=spec.hidden_dropout, embd_pdrop=spec.hidden_dropout,
            attn_pdrop=spec.attention_dropout, **common)
    llama_like = dict(
        num_hidden_layers=spec.num_layers, hidden_size=spec.hidden_size, intermediate_size=spec.ffn_hidden_size,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_query_groups,
        hidden_act="silu", max_position_embeddings=spec.max_position_embeddings, rms_norm_eps=spec.norm_epsilon,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rotary_base)},
        attention_dropout=spec.attention_dropout, **common)
    if arch == "LlamaForCausalLM":
        return transformers.LlamaConfig(head_dim=spec.kv_channels, attention_bias=spec.linear_bias,
                                        mlp_bias=spec.linear_bias, **llama_like)
    if arch == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**llama_like)
    return transformers.Qwen3Config(head_dim=spec.kv_channels, attention_bias=False, **llama_like)


# ----- tensors: megatron-core names -> transformers names -----

def split_qkv(fused: torch.Tensor, heads: int, groups: int, head_dim: int):
    """(query, key, value) rows of megatron-core's fused projection (weight [rows, in] or bias [rows])."""
    per_group = fused.view(groups, heads // groups + 2, head_dim, *fused.shape[1:])
    q = per_group[:, :heads // groups].reshape(heads * head_dim, *fused.shape[1:])
    return q, per_group[:, -2].reshape(groups * head_dim, *fused.shape[1:]), per_group[:, -1].reshape(
        groups * head_dim, *fused.shape[1:])


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int, head_dim: int):
    """The inverse of split_qkv."""
    rest = q.shape[1:]
    parts = (q.reshape(groups, heads // groups, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
             v.reshape(groups, 1, head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(groups * (heads // groups + 2) * head_dim, *rest)


def export_tensors(spec: ModelSpec, arch: str, weights: dict):
    """Yield (transformers name, tensor) for the checkpoint's weights ({megatron-core name: tensor}),
    one at a time: each is a view or a new tensor made from the (memory-mapped) input only when
    the consumer asks for it."""
    def w(name):
        if name not in weights:
            raise Unsupported(f"the checkpoint has no tensor {name} (its layers do not match its recorded flags)")
        return weights[name]

    qkv = dict(heads=spec.num_attention_heads, groups=spec.num_query_groups, head_dim=spec.kv_channels)
    V = spec.vocab_rows
    gpt2 = arch == "GPT2LMHeadModel"
    prefix = "transformer." if gpt2 else "model."
    yield prefix + ("wte.weight" if gpt2 else "embed_tokens.weight"), w("embedding.word_embeddings.weight")[:V]
    if gpt2:
        yield "transformer.wpe.weight", w("embedding.position_embeddings.weight")
    for i in range(spec.num_layers):
        m = f"decoder.layers.{i}."
        if gpt2:
            h = f"transformer.h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                yield h + theirs + ".weight", w(m + ours + ".weight")
                yield h + theirs + ".bias", w(m + ours + ".bias")
            yield h + "attn.c_attn.weight", torch.cat(split_qkv(w(m + "self_attention.linear_qkv.weight"), **qkv)).t()
            yield h + "attn.c_attn.bias", torch.cat(split_qkv(w(m + "self_attention.linear_qkv.bias"), **qkv))
            for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                                 ("mlp.linear_fc2", "mlp.c_proj")):
                yield h + theirs + ".weight", w(m + ours + ".weight").t()  # Conv1D: [in, out]
                yield h + theirs + ".bias", w(m + ours + ".bias")
            continue
        h = f"model.layers.{i}."
        yield h + "input_layernorm.weight", w(m + "input_layernorm.weight")
        yield h + "post_attention_layernorm.weight", w(m + "pre_mlp_layernorm.weight")
        for kind in ("weight", "bias") if spec.qkv_bias else ("weight",):
            for name, t in zip("qkv", split_qkv(w(m + "self_attention.linear_qkv." + kind), **qkv)):
                yield h + f"self_attn.{name}_proj.{kind}", t
        if spec.qk_layernorm:
            yield h + "self_attn.q_norm.weight", w(m + "self_attention.q_layernorm.weight")
            yield h + "self_attn.k_norm.weight", w(m + "self_attention.k_layernorm.weight")
        fc1 = w(m + "mlp.linear_fc1.weight")
        ffn = spec.ffn_hidden_size
        yield h + "mlp.gate_proj.weight", fc1[:ffn]
        yield h + "mlp.up_proj.weight", fc1[ffn:]
        yield h + "self_attn.o_proj.weight", w(m + "self_attention.linear_proj.weight")
        yield h + "mlp.down_proj.weight", w(m + "mlp.linear_fc2.weight")
        if spec.linear_bias:
            fc1_bias = w(m + "mlp.linear_fc1.bias")
            yield h + "mlp.gate_proj.bias", fc1_bias[:ffn]
            yield h + "mlp.up_proj.bias", fc1_bias[ffn:]
            yield h + "self_attn.o_proj.bias", w(m + "self_attention.linear_proj.bias")
            yield h + "mlp.down_proj.bias", w(m + "mlp.linear_fc2.bias")
    final = "transformer.ln_f." if gpt2 else "model.norm."
    yield final + "weight", w("decoder.final_layernorm.weight")
    if spec.normalization == "LayerNorm":
        yield final + "bias", w("decoder.final_layernorm.bias")
    if spec.untie_embeddings_and_output_weights:
        yield "lm_head.weight", w("output_layer.weight")[:V]


def write_safetensors(tensors, out_dir: str, dtype: torch.dtype, max_shard_bytes: int) -> list:
    """Write (name, tensor) pairs as transformers' model.safetensors, or as shards of at most
    max_shard_bytes with model.safetensors.index.json; each shard is freed once written.
    Returns the files written."""
    from safetensors.torch import save_file

    shards, weight_map, shard, size, total = [], {}, {}, 0, 0

    umask = os.umask(0)
    os.umask(umask)

    def flush():
        name = f"shard-{len(shards):05d}.tmp"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, name), 0o666 & ~umask)  # safetensors creates its files 0600
        shards.append((name, list(shard)))
        shard.clear()

    for name, t in tensors:
        out = torch.empty(t.shape, dtype=dtype)  # its own memory: never a view of the input
        out.copy_(t)
        if shard and size + out.nbytes > max_shard_bytes:
            flush()
            size = 0
        shard[name] = out
        size += out.nbytes
        total += out.nbytes
    flush()
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0][0]), os.path.join(out_dir, "model.safetensors"))
        return ["model.safetensors"]
    files = []
    for index, (tmp, names) in enumerate(shards, 1):
        final = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, final))
        weight_map.update({n: final for n in names})
        files.append(final)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files + ["model.safetensors.index.json"]


# ----- tokenizer files -----

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt", "chat_template.jinja")


def tokenizer_files(path: str | None, recorded: dict) -> dict:
    """{file name in the Hugging Face directory: source path} of the tokenizer: --tokenizer-model
    PATH (a tokenizer directory or a tokenizer.json) when given, else the files the checkpoint's
    tokenizer flags name (HuggingFaceTokenizer's directory, GPT2BPETokenizer's vocab and merges)."""
    if path is None:
        if recorded.get("tokenizer_type") == "GPT2BPETokenizer" and recorded.get("vocab_file"):
            found = {"vocab.json": recorded["vocab_file"], "merges.txt": recorded.get("merge_file")}
            return {k: v for k, v in found.items() if v and os.path.isfile(v)}
        path = recorded.get("tokenizer_model")
        if not path or not os.path.exists(path):
            return {}
    if os.path.isfile(path):
        return {"tokenizer.json" if path.endswith(".json") else os.path.basename(path): path}
    if not os.path.isdir(path):
        raise Unsupported(f"--tokenizer-model {path}: no such file or directory")
    found = {n: os.path.join(path, n) for n in TOKENIZER_FILES if os.path.isfile(os.path.join(path, n))}
    if not found:
        raise Unsupported(f"--tokenizer-model {path}: the directory holds none of {', '.join(TOKENIZER_FILES)}")
    return found


def copy_tokenizer(files: dict, out_dir: str) -> None:
    for name, source in files.items():
        shutil.copyfile(source, os.path.join(out_dir, name))
    if "tokenizer.json" in files and "tokenizer_config.json" not in files:
        # a bare tokenizer.json: tell AutoTokenizer which class reads it
        with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)


# ----- import: transformers -> this trainer -----

IMPORTABLE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}


def _rope_theta(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        raise Unsupported(f"rope_type {rope['rope_type']!r} (scaled rotary embeddings) has no equivalent here")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise Unsupported("partial_rotary_factor < 1 has no equivalent here")
    return float(rope.get("rope_theta", 10000.0))


def model_args_of(config) -> dict:
    """Our flags' values (a checkpoint's "args") for a transformers config, or Unsupported."""
    kind = config.model_type
    if kind not in IMPORTABLE:
        raise Unsupported(f"model_type {kind!r}: importable are {', '.join(IMPORTABLE.values())}")
    if kind == "gpt2":
        act = config.activation_function
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise Unsupported(f"activation_function {act!r}: this trainer's GPT has GELU (exact or tanh)")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if getattr(config, flag, False):
                raise Unsupported(f"{flag}=True has no equivalent here")
        if not getattr(config, "scale_attn_weights", True):
            raise Unsupported("scale_attn_weights=False has no equivalent here")
        if config.embd_pdrop != config.resid_pdrop:
            raise Unsupported("embd_pdrop differs from resid_pdrop: one --hidden-dropout covers both here")
        h, heads = config.n_embd, config.n_head
        return dict(num_layers=config.n_layer, hidden_size=h, ffn_hidden_size=config.n_inner or 4 * h,
                    num_attention_heads=heads, num_query_groups=heads, kv_channels=h // heads,
                    max_position_embeddings=config.n_positions, untie_embeddings_and_output_weights=not config.tie_word_embeddings,
                    normalization="LayerNorm", norm_epsilon=config.layer_norm_epsilon, swiglu=False,
                    openai_gelu=act != "gelu", disable_bias_linear=False, add_qkv_bias=False, qk_layernorm=False,
                    position_embedding_type="learned_absolute", hidden_dropout=config.resid_pdrop,
                    attention_dropout=config.attn_pdrop, padded_vocab_size=config.vocab_size)
    if config.hidden_act != "silu":
        raise Unsupported(f"hidden_act {config.hidden_act!r}: the SwiGLU MLP here uses SiLU")
    if getattr(config, "use_sliding_window", False):
        raise Unsupported("sliding-window attention has no equivalent here")
    theta = _rope_theta(config)
    heads, h = config.num_attention_heads, config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // heads
    if kind == "llama":
        if config.attention_bias != config.mlp_bias:
            raise Unsupported("attention_bias differs from mlp_bias: --disable-bias-linear covers both here")
        bias, qkv_bias, qk_norm = config.attention_bias, False, False
    else:
        bias, qk_norm = False, kind == "qwen3"
        qkv_bias = kind == "qwen2"
        if kind == "qwen3" and config.attention_bias:
            raise Unsupported("Qwen3 with attention_bias=True (biases on the output projection too) has no "
                              "equivalent here")
    if theta != int(theta):
        raise Unsupported(f"rope_theta {theta} is not an integer (--rotary-base takes integers)")
    return dict(num_layers=config.num_hidden_layers, hidden_size=h, ffn_hidden_size=config.intermediate_size,
                num_attention_heads=heads, num_query_groups=config.num_key_value_heads, kv_channels=head_dim,
                max_position_embeddings=config.max_position_embeddings,
                untie_embeddings_and_output_weights=not config.tie_word_embeddings, normalization="RMSNorm",
                norm_epsilon=config.rms_norm_eps, swiglu=True, openai_gelu=False, disable_bias_linear=not bias,
                add_qkv_bias=qkv_bias, qk_layernorm=qk_norm, position_embedding_type="rope", rotary_base=int(theta),
                rotary_percent=1.0, hidden_dropout=0.0, attention_dropout=float(config.attention_dropout),
                padded_vocab_size=config.vocab_size)


def import_tensors(spec: ModelSpec, kind: str, get):
    """Yield (megatron-core name, fp32 tensor) from get(transformers name) -> tensor, one at a time."""
    def f32(t):
        out = torch.empty(t.shape, dtype=torch.float32)
        out.copy_(t)
        return out

    qkv = dict(heads=spec.num_attention_heads, groups=spec.num_query_groups, head_dim=spec.kv_channels)
    gpt2 = kind == "gpt2"
    yield "embedding.word_embeddings.weight", f32(get("transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"))
    if gpt2:
        yield "embedding.position_embeddings.weight", f32(get("transformer.wpe.weight"))
    h_size = spec.hidden_size
    for i in range(spec.num_layers):
        m = f"decoder.layers.{i}."
        if gpt2:
            h = f"transformer.h.{i}."
            for ours, theirs in (("input_layernorm", "ln_1"), ("pre_mlp_layernorm", "ln_2")):
                yield m + ours + ".weight", f32(get(h + theirs + ".weight"))
                yield m + ours + ".bias", f32(get(h + theirs + ".bias"))
            c_attn = get(h + "attn.c_attn.weight").t()  # [3 h, in]: all queries, keys, values
            yield m + "self_attention.linear_qkv.weight", f32(fuse_qkv(*c_attn.split(h_size), **qkv))
            yield m + "self_attention.linear_qkv.bias", f32(fuse_qkv(*get(h + "attn.c_attn.bias").split(h_size), **qkv))
            for ours, theirs in (("self_attention.linear_proj", "attn.c_proj"), ("mlp.linear_fc1", "mlp.c_fc"),
                                 ("mlp.linear_fc2", "mlp.c_proj")):
                yield m + ours + ".weight", f32(get(h + theirs + ".weight").t())
                yield m + ours + ".bias", f32(get(h + theirs + ".bias"))
            continue
        h = f"model.layers.{i}."
        yield m + "input_layernorm.weight", f32(get(h + "input_layernorm.weight"))
        yield m + "pre_mlp_layernorm.weight", f32(get(h + "post_attention_layernorm.weight"))
        for kind_ in ("weight", "bias") if spec.qkv_bias else ("weight",):
            parts = [get(h + f"self_attn.{n}_proj.{kind_}") for n in "qkv"]
            yield m + "self_attention.linear_qkv." + kind_, f32(fuse_qkv(*parts, **qkv))
        if spec.qk_layernorm:
            yield m + "self_attention.q_layernorm.weight", f32(get(h + "self_attn.q_norm.weight"))
            yield m + "self_attention.k_layernorm.weight", f32(get(h + "self_attn.k_norm.weight"))
        yield m + "self_attention.linear_proj.weight", f32(get(h + "self_attn.o_proj.weight"))
        yield m + "mlp.linear_fc1.weight", f32(torch.cat([get(h + "mlp.gate_proj.weight"), get(h + "mlp.up_proj.weight")]))
        yield m + "mlp.linear_fc2.weight", f32(get(h + "mlp.down_proj.weight"))
        if spec.linear_bias:
            yield m + "self_attention.linear_proj.bias", f32(get(h + "self_attn.o_proj.bias"))
            yield m + "mlp.linear_fc1.bias", f32(torch.cat([get(h + "mlp.gate_proj.bias"), get(h + "mlp.up_proj.bias")]))
            yield m + "mlp.linear_fc2.bias", f32(get(h + "mlp.down_proj.bias"))
    final = "transformer.ln_f." if gpt2 else "model.norm."
    yield "decoder.final_layernorm.weight", f32(get(final + "weight"))
    if gpt2:
        yield "decoder.final_layernorm.bias", f32(get(final + "bias"))
    if spec.untie_embeddings_and_output_weights:
        yield "output_layer.weight", f32(get("lm_head.weight"))


class SafetensorsReader:
    """get(name) -> tensor over a transformers directory's model.safetensors or its shards (each
    file memory-mapped by safetensors; a tensor is read when asked for)."""

    def __init__(self, hf_dir: str):
        from safetensors import safe_open

        index = os.path.join(hf_dir, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise Unsupported(f"{index} is not a safetensors index ({type(exc).__name__}: {exc})") from None
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise Unsupported(f"{hf_dir} holds no model.safetensors (or model.safetensors.index.json): save the "
                              "model with save_pretrained(..., safe_serialization=True)")
        self.where = {}
        self.handles = []
        self.used = set()  # the names asked for: what is left over, the config did not describe
        for name in files:
            path = os.path.join(hf_dir, name)
            try:
                handle = safe_open(path, framework="pt")
            except Exception as exc:  # safetensors' own error type: a truncated or damaged header
                raise Unsupported(f"{path} cannot be read: {first_line(exc)} (a damaged or incomplete file)") from None
            self.handles.append(handle)
            self.where.update({k: (handle, path) for k in handle.keys()})

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise Unsupported(f"the model's weights have no tensor {name}")
        handle, path = self.where[name]
        self.used.add(name)
        try:
            return handle.get_tensor(name)
        except Exception as exc:  # its bytes lie past the end of a truncated file
            raise Unsupported(f"{path}: tensor {name} cannot be read: {first_line(exc)} (a damaged or incomplete "
                              "file)") from None

    def unused(self) -> list:
        """Tensors of the files that the import did not take (rotary tables transformers may save aside)."""
        return sorted(n for n in self.where if n not in self.used and not n.endswith("rotary_emb.inv_freq"))


def vocab_divisor(vocab_size: int, tokenizer_size: int | None) -> int:
    """A --make-vocab-size-divisible-by that pads the tokenizer's vocabulary to exactly vocab_size:
    the largest power of two up to Megatron-LM's 128 that does, else vocab_size itself."""
    tokens = tokenizer_size or vocab_size
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if padded_vocab_size(tokens, d) == vocab_size:
            return d
    return vocab_size


def training_flags(args: dict, divisor: int, seq_length: int) -> list:
    """The pretrain_gpt.py flags that build the model `args` (a checkpoint's "args") describe."""
    flags = ["--num-layers", args["num_layers"], "--hidden-size", args["hidden_size"],
             "--ffn-hidden-size", args["ffn_hidden_size"], "--num-attention-heads", args["num_attention_heads"]]
    if args["num_query_groups"] != args["num_attention_heads"]:
        flags += ["--group-query-attention", "--num-query-groups", args["num_query_groups"]]
    if args["kv_channels"] * args["num_attention_heads"] != args["hidden_size"]:
        flags += ["--kv-channels", args["kv_channels"]]
    flags += ["--max-position-embeddings", args["max_position_embeddings"], "--seq-length", seq_length]
    if args["normalization"] != "LayerNorm":
        flags += ["--normalization", args["normalization"]]
    flags += ["--norm-epsilon", args["norm_epsilon"]]
    for flag in ("swiglu", "openai_gelu", "disable_bias_linear", "add_qkv_bias", "qk_layernorm",
                 "untie_embeddings_and_output_weights"):
        if args[flag]:
            flags.append("--" + flag.replace("_", "-"))
    if args["position_embedding_type"] == "rope":
        flags += ["--position-embedding-type", "rope", "--rotary-base", args["rotary_base"]]
    flags += ["--hidden-dropout", args["hidden_dropout"], "--attention-dropout", args["attention_dropout"],
              "--make-vocab-size-divisible-by", divisor]
    return [str(f) for f in flags]
