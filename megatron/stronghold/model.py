"""The one model every method trains: megatron-core's GPTModel with the local layer spec.

The layer is GPT-2's by default and Llama's with Megatron-LM's flags (--normalization RMSNorm
--swiglu --position-embedding-type rope --group-query-attention --disable-bias-linear ...), all
through megatron-core's TransformerConfig and local spec. Plugged in through its public surface:
- core attention through torch's scaled_dot_product_attention (flash kernels on GPU, and it runs on
  the CPU, where the spec's default attention needs CUDA);
- every norm, the final one included, torch's LayerNorm or RMSNorm (megatron-core's
  WrappedTorchNorm): the block would otherwise take apex's FusedLayerNorm for the final norm where
  apex is installed, which has no RMSNorm, and the same model would compute differently on machines
  with and without apex;
- rotary embeddings that also run without CUDA (RotaryEmbedding below);
- full activation recompute through torch.utils.checkpoint, per layer, which saves and restores both
  CPU and CUDA RNG state, so recompute is exact with dropout on either device (megatron-core's own
  recompute path is CUDA-only).
"""

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.core.models.common.embeddings import rotary_pos_embedding
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer

from .layer_shape import LayerShape


def conversation_mask(segments: torch.Tensor) -> torch.Tensor:
    """[b, 1, s, s] True where a query may attend a key: an earlier-or-same token of its own
    conversation, from each token's conversation number ([b, s], non-decreasing, data's `segments`)."""
    s = segments.shape[1]
    position = torch.arange(s, device=segments.device)
    causal = position[:, None] >= position[None, :]
    return (segments[:, None, :, None] == segments[:, None, None, :]) & causal


class SDPAttention(DotProductAttention):
    """Causal attention through F.scaled_dot_product_attention, for [s, b, heads, dim] inputs.

    attention_mask is None (one causal sequence) or, for packed conversations, each token's
    conversation number [b, s]: a token then sees only its own conversation (a boolean mask). Rotary
    embeddings stay those of each token's place in the packed sequence: within a conversation they
    differ from its own positions by a constant, and a rotary score depends only on the difference of
    two positions."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        assert packed_seq_params is None and attention_bias is None
        dropout = self.attention_dropout.p if self.training else 0.0
        return attend(query, key, value, attention_mask, dropout, self.softmax_scale)


def attend(query, key, value, segments=None, dropout=0.0, scale=None):
    """SDPAttention's computation: [s, b, heads, dim] query and [s, b, groups, dim] key and value ->
    [s, b, heads * dim], causal, and within each token's conversation where `segments` ([b, s]) is given.
    torch picks the kernel (on an H100 with torch 2.11, cuDNN's for both paths); tools/attention_check.py
    holds each kernel to fp32 attention on a card."""
    s, b, heads = query.shape[0], query.shape[1], query.shape[2]
    groups = heads // key.shape[2]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=2)
        value = value.repeat_interleave(groups, dim=2)
    q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dim]
    mask = None if segments is None else conversation_mask(segments)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                         scale=scale)
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * query.shape[3])


class RotaryEmbedding(rotary_pos_embedding.RotaryEmbedding):
    """megatron-core's rotary embedding, also on a machine without CUDA: the library's moves its
    frequencies to the current CUDA device on first use, which such a machine does not have."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        if torch.cuda.is_available():  # the trainer's device (training.pick_device)
            return super().get_emb(max_seq_len, offset)
        assert not self.rotary_interleaved  # the flags build rotary_interleaved=False only
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)  # [s, rotated channels / 2]
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]


def activation(args):
    """The MLP's activation: SiLU for SwiGLU, GELU otherwise (exact, or tanh with --openai-gelu)."""
    if args.swiglu:
        return F.silu
    return functools.partial(F.gelu, approximate="tanh") if args.openai_gelu else F.gelu


def transformer_config(args) -> TransformerConfig:
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        qk_layernorm=args.qk_layernorm,
        gated_linear_unit=args.swiglu,
        activation_func=activation(args),
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        use_cpu_initialization=True,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        params_dtype=torch.float32,
        # Megatron-LM's GPT defaults that matter for numerics.
        init_method_std=0.02,
        apply_residual_connection_post_layernorm=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )


def placed_layer_class(place_layer):
    """A TransformerLayer that hands itself to place_layer(index, layer) as soon as it is
    initialised, before the next one exists, so the whole model need never be in fp32 on the host
    at once. A class per build: the placement travels with the spec, not through a global."""

    class PlacedTransformerLayer(TransformerLayer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            place_layer(self.layer_number - 1, self)

    return PlacedTransformerLayer


def layer_spec(args, place_layer=None) -> TransformerBlockSubmodules:
    """megatron-core's local spec with our attention and torch's norms, for the whole block: the
    layers' norms and the final one are the same implementation on every machine."""
    spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm, normalization=args.normalization)
    if place_layer is not None:
        spec.module = placed_layer_class(place_layer)
    layer = spec.submodules
    layer.input_layernorm = layer.pre_mlp_layernorm = WrappedTorchNorm
    attention = layer.self_attention.submodules
    attention.core_attention = SDPAttention
    if args.qk_layernorm:
        attention.q_layernorm = attention.k_layernorm = WrappedTorchNorm
    else:
        assert attention.q_layernorm is IdentityOp and attention.k_layernorm is IdentityOp
    return TransformerBlockSubmodules(layer_specs=[spec] * args.num_layers, layer_norm=WrappedTorchNorm)


def build_model(args, vocab_size: int, place_layer=None, streamed=(), recomputed=None) -> GPTModel:
    """Build the GPT in fp32 on the CPU from the current RNG state (same weights for every method).

    place_layer(index, layer), if given, moves each transformer layer to where the method keeps it
    right after its initialisation; the RNG stream, and so every weight, is the same either way.
    recomputed: the indices of the layers that run again in backward where a plan chose them (else
    the flags' checkpointed_layers); streamed layers never (their executor recomputes them itself).
    """
    model = GPTModel(
        config=transformer_config(args),
        transformer_layer_spec=layer_spec(args, place_layer),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    if args.position_embedding_type == "rope":  # no parameters, no random numbers: the weights stay
        model.rotary_pos_emb = RotaryEmbedding(
            kv_channels=model.config.kv_channels, rotary_percent=args.rotary_percent,
            rotary_base=args.rotary_base, use_cpu_initialization=True, cp_group=model.pg_collection.cp)
    for index in checkpointed_layers(args) if recomputed is None else recomputed:
        if index not in streamed:  # the streaming executor recomputes its layers itself (or keeps their graph)
            enable_recompute(model.decoder.layers[index])
    return model


def checkpointed_layers(args):
    if args.recompute_granularity != "full":
        return []
    if args.recompute_method == "block":
        return list(range(min(args.recompute_num_layers, args.num_layers)))
    return list(range(args.num_layers))


def enable_recompute(layer: torch.nn.Module) -> None:
    """Recompute this layer's forward in backward; hooks on the layer still fire once per call.

    The hidden state goes to checkpoint positionally: checkpoint saves and restores the RNG state of
    the devices of its positional tensors only, and with the hidden state as a keyword it kept only
    the CPU's, so on a GPU the recompute drew other dropout masks than the forward."""
    inner = layer.forward

    @functools.wraps(inner)
    def forward(hidden_states, *a, **kw):
        return checkpoint(inner, hidden_states, *a, use_reentrant=False, **kw)

    layer.forward = forward


def transformer_layers(model: GPTModel):
    return list(model.decoder.layers)


def num_parameters(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lm_loss(model, batch):
    """Mean per-token loss over the micro-batch's unmasked tokens, as Megatron-LM's loss_func."""
    losses = model(batch["tokens"], batch["position_ids"], batch.get("segments"), labels=batch["labels"])
    return masked_mean(losses, batch["loss_mask"])


def masked_mean(losses, mask):
    return (losses.float() * mask).sum() / mask.sum()


def flops_per_iteration(args, vocab_size: int) -> float:
    """Model FLOPs per iteration as Megatron-LM counts them: forward and backward (3 x forward) of
    every layer's matrix products and attention as the flags shape them (grouped-query attention's
    smaller key/value projections, SwiGLU's three MLP matrices, layer_shape.py) and of the output
    layer; no recompute counted, norms and biases neither."""
    tokens = args.global_batch_size * args.seq_length
    forward = (args.num_layers * LayerShape.of(args).forward_flops(tokens, args.seq_length)
               + 2 * tokens * args.hidden_size * vocab_size)
    return 3 * forward


# ----- the model in stages, for schedules that do not run it micro-batch by micro-batch -----
# GPTModel.forward is embedding -> decoder (layers, final norm) -> output layer and loss; these are
# the same calls, one stage at a time (megatron-core 0.16's _preprocess/_postprocess, what forward uses).

class LayerInputs(NamedTuple):
    """What every layer takes for one micro-batch besides its hidden state (GPTModel.forward's)."""
    rotary_pos_emb: Optional[torch.Tensor]
    attention_mask: Optional[torch.Tensor]  # packed conversations: each token's (SDPAttention)


def embed(model: GPTModel, batch):
    """(decoder input [s, b, h], LayerInputs) of one micro-batch."""
    out = model._preprocess(input_ids=batch["tokens"], position_ids=batch["position_ids"])
    return out[0], LayerInputs(out[1], batch.get("segments"))


def run_layer(layer, hidden, inputs: LayerInputs):
    return layer(hidden_states=hidden, attention_mask=inputs.attention_mask, rotary_pos_emb=inputs.rotary_pos_emb)[0]


def head_loss(model: GPTModel, layers, hidden, batch, inputs: LayerInputs):
    """lm_loss of one micro-batch from the hidden state before `layers` (the model's last layers)."""
    for layer in layers:
        hidden = run_layer(layer, hidden, inputs)
    hidden = model.decoder.final_layernorm(hidden)
    losses = model._postprocess(hidden_states=hidden, input_ids=batch["tokens"],
                                position_ids=batch["position_ids"], labels=batch["labels"],
                                rotary_pos_emb=inputs.rotary_pos_emb, rotary_pos_cos=None, rotary_pos_sin=None)
    return masked_mean(losses, batch["loss_mask"])
