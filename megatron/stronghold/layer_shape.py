"""The sizes of one transformer layer as the flags build it: parameters, matrix products, activations.

The planner's byte counts and the FLOPs on the iteration line come from here, so they follow the
layer the flags describe (GPT-2's or Llama's) and not one fixed formula. tests/test_llama.py checks
them against the parameters of a layer megatron-core builds.

Names: h hidden size, n query heads, g key/value heads (query groups), d head width (--kv-channels),
f MLP width (--ffn-hidden-size).
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    heads: int
    query_groups: int
    head_dim: int
    ffn: int
    gated: bool          # SwiGLU: the first MLP matrix is 2 f wide (gate and up projections)
    linear_bias: bool    # biases on the attention and MLP projections
    qkv_bias: bool       # a bias on the query/key/value projection (also without linear_bias)
    norm_bias: bool      # LayerNorm has a bias, RMSNorm none
    qk_norm: bool        # a norm over each head's queries and keys (d wide each)
    tensor_parallel: int = 1

    @classmethod
    def of(cls, args) -> "LayerShape":
        return cls(hidden=args.hidden_size, heads=args.num_attention_heads, query_groups=args.num_query_groups,
                   head_dim=args.kv_channels, ffn=args.ffn_hidden_size, gated=bool(args.swiglu),
                   linear_bias=not args.disable_bias_linear,
                   qkv_bias=not args.disable_bias_linear or bool(args.add_qkv_bias),
                   norm_bias=args.normalization == "LayerNorm", qk_norm=bool(args.qk_layernorm),
                   tensor_parallel=getattr(args, "tensor_model_parallel_size", 1))

    @property
    def query_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.query_groups * self.head_dim

    @property
    def fc1_width(self) -> int:
        return self.ffn * (2 if self.gated else 1)

    @property
    def norm_params(self) -> int:
        """Parameters of one norm over the hidden state: its weight, and a bias for LayerNorm."""
        return self.hidden * (2 if self.norm_bias else 1)

    def matmul_params(self) -> int:
        """Weights of the layer's matrix products (the whole layer): query/key/value, output
        projection, the two MLP matrices."""
        h = self.hidden
        return h * (self.query_width + 2 * self.kv_width) + self.query_width * h + h * self.fc1_width + self.ffn * h

    def params(self) -> int:
        """Parameters one tensor-parallel rank holds: the column-parallel matrices (query/key/value,
        MLP first) and their biases are split, the row-parallel ones (output projection, MLP second)
        too but not their biases, which every rank holds whole, as the norms."""
        h, t = self.hidden, self.tensor_parallel
        qkv = self.query_width + 2 * self.kv_width
        split = self.matmul_params() + (qkv if self.qkv_bias else 0) + (self.fc1_width if self.linear_bias else 0)
        norm = 2 if self.norm_bias else 1
        whole = (2 * self.norm_params + (2 * self.head_dim * norm if self.qk_norm else 0)
                 + (2 * h if self.linear_bias else 0))
        return split // t + whole

    def forward_flops(self, tokens: int, seq_length: int) -> int:
        """One forward pass over `tokens` tokens in sequences of seq_length: 2 per weight of every
        matrix product and token, and the attention scores and their product with the values
        (2 s d each per token and head; causal masking not discounted, as in Megatron-LM)."""
        return 2 * tokens * self.matmul_params() + 4 * tokens * seq_length * self.query_width

    def activation_elements(self) -> int:
        """Compute-dtype elements per token that one layer keeps from forward to backward without
        recompute (Korthikanti et al. 2022 with a flash-attention kernel): the inputs of the two
        norms and of every matrix product, the queries, keys and values the attention kernel keeps
        (keys and values repeated to n heads for grouped-query attention, see model.SDPAttention),
        the per-head norms' inputs, and the MLP's activation inputs and outputs (GELU: its input;
        SwiGLU: the 2 f first-layer output and the SiLU output). A GPT-2 layer: 16 h; in bf16, with
        its two one-byte dropout masks, 34 h bytes, i.e. 17 bf16 hidden states."""
        h, q = self.hidden, self.query_width
        attention = h + 3 * q + q + (q + self.kv_width if self.qk_norm else 0)  # qkv in, q k v, proj in
        mlp = h + (3 * self.ffn if self.gated else self.ffn) + self.ffn  # fc1 in, activation, fc2 in
        return 2 * h + attention + mlp

    def activation_bytes(self, compute_bytes: int, tokens: int) -> int:
        """Bytes one layer keeps for `tokens` tokens of one micro-batch (per tensor-parallel rank:
        all of it counted as divided by the ranks), with two one-byte dropout masks of h."""
        return tokens * (compute_bytes * self.activation_elements() + 2 * self.hidden) // self.tensor_parallel
