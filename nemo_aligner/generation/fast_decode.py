"""A lean one-token decode step for megatron-core's local-spec ``GPTModel``, used after the prefill.

Why: a one-token forward through megatron-core's modules costs ~150 small torch calls per layer (autograd
function wrappers, RNG-tracker forks around a zero dropout, offload/nvtx hooks, and a RoPE re-rotation of the
*whole* cached key sequence every step, since its static cache keeps keys before RoPE). On a small model that
overhead, not the arithmetic, sets the speed of generation. :class:`FastDecoder` runs the same arithmetic as
megatron-core 0.16.1 for a one-token step, op for op (same products in the same shapes, same order of additions),
with keys cached after RoPE (each key is rotated once, with the same elementwise formula megatron applies).

It only runs where that mirror is known to hold (:func:`unsupported_reason`): one process (no tensor, pipeline,
context or expert parallelism), float32 without autocast, and megatron's own local-spec modules with no feature
that changes the step (no MoE, MLA, qk-norm, fused kernels, sliding window, softmax offset, LoRA-wrapped linears,
SDPA core attention, ...). Anything else decodes through megatron's modules. The norms are called as modules, so
every norm variant of the spec is covered. ``tests/generation/test_fast_decode.py`` checks it against megatron's
path for RoPE and learned positions, GQA, SwiGLU and GELU, RMSNorm and LayerNorm, with and without biases.
"""

from __future__ import annotations

import megatron.core
import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from nemo_aligner.utils import mcore_compat

MIRRORED_MEGATRON_CORE = "0.16."
"""The megatron-core release whose one-token step :class:`FastDecoder` mirrors; others decode through megatron."""


def unsupported_reason(gpt: GPTModel, autocast_dtype: torch.dtype | None) -> str | None:
    """Why :class:`FastDecoder` cannot stand in for ``gpt``'s one-token forward, or None when it can."""
    if not megatron.core.__version__.startswith(MIRRORED_MEGATRON_CORE):
        return f"megatron-core {megatron.core.__version__} (the fast step mirrors {MIRRORED_MEGATRON_CORE}x)"
    config = gpt.config
    parallel = (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_context_parallel_world_size(),
        parallel_state.get_expert_model_parallel_world_size(),
    )
    if parallel != (1, 1, 1, 1):
        return f"model parallelism (tp, pp, cp, ep) = {parallel}"
    if autocast_dtype is not None or any(p.dtype != torch.float32 for p in gpt.parameters()):
        return "not float32"
    if gpt.position_embedding_type not in ("rope", "learned_absolute", "none"):
        return f"position embedding {gpt.position_embedding_type!r}"
    if gpt.embedding.tokentype_embeddings is not None or getattr(gpt, "mtp_process", False):
        return "token-type embeddings or multi-token prediction"
    for name, value in (
        ("rotary_interleaved", config.rotary_interleaved),
        ("apply_rope_fusion", config.apply_rope_fusion),
        ("multi_latent_attention", config.multi_latent_attention),
        ("no_rope_freq", config.no_rope_freq),
        ("mrope_section", config.mrope_section),
        ("flash_decode", config.flash_decode),
        ("attention_output_gate", config.attention_output_gate),
        ("window_size", config.window_size),
        ("num_moe_experts", config.num_moe_experts),
        ("fp32_residual_connection", config.fp32_residual_connection),
        ("bias_activation_fusion", config.bias_activation_fusion),
        ("use_te_activation_func", config.use_te_activation_func),
        ("activation_func_clamp_value", config.activation_func_clamp_value),
        ("inference_fuse_tp_communication", config.inference_fuse_tp_communication),
        ("sequence_parallel", config.sequence_parallel),
    ):
        if value:
            return f"config.{name}={value!r}"
    if config.softmax_type != "vanilla":
        return f"config.softmax_type={config.softmax_type!r}"
    if type(gpt.output_layer) is not ColumnParallelLinear or gpt.decoder.final_layernorm is None:
        return "output layer or final norm"
    for layer in gpt.decoder.layers:
        attention, mlp = layer.self_attention, layer.mlp
        exact_types = (
            type(layer) is TransformerLayer
            and type(attention) is SelfAttention
            and type(attention.core_attention) is DotProductAttention
            and type(attention.linear_qkv) is ColumnParallelLinear
            and type(attention.linear_proj) is RowParallelLinear
            and type(mlp) is MLP
            and type(mlp.linear_fc1) is ColumnParallelLinear
            and type(mlp.linear_fc2) is RowParallelLinear
            and all(
                type(module) is IdentityOp
                for module in (attention.q_layernorm, attention.k_layernorm, layer.cross_attention)
            )
        )
        if not exact_types:
            return f"layer {layer.layer_number} is not megatron's plain local-spec layer"
        if layer.recompute_input_layernorm or layer.recompute_pre_mlp_layernorm:
            return "layernorm recomputation"
    return None


def _linear(module: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor, weight: torch.Tensor | None = None):
    """megatron's single-process linear: ``(x @ W^T [+ b], b if skip_bias_add else None)``."""
    output = torch.matmul(x, (module.weight if weight is None else weight).t())
    if module.bias is not None and not module.skip_bias_add:
        return output + module.bias, None
    return output, module.bias if module.skip_bias_add else None


def _bias_add(output: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor) -> torch.Tensor:
    """megatron's bias-dropout-add in inference (dropout is the identity)."""
    return residual + (output if bias is None else output + bias)


class FastDecoder:
    """One-token KV-cached decode steps of ``gpt`` (see the module docstring), continuing a megatron prefill
    of ``length`` positions whose static cache it takes over.

    Holds its own cache: per layer, keys after RoPE and values, ``[batch, heads, capacity, head_dim]``: the
    operands megatron's attention builds every step (the cache with each query group's key and value repeated
    for its heads, a full copy per layer and step under grouped-query attention), kept instead of rebuilt. The
    cost is the repeated heads' memory. Batch-major rows make the products' operands contiguous per head.
    """

    def __init__(self, gpt: GPTModel, cache: mcore_compat.StaticInferenceContext, length: int) -> None:
        self.gpt = gpt
        self.layers = list(gpt.decoder.layers)
        attention = self.layers[0].self_attention
        self.groups = attention.num_query_groups_per_partition
        self.heads = attention.num_attention_heads_per_partition
        self.head_dim = attention.hidden_size_per_attention_head
        self.cos = self.sin = None
        if gpt.position_embedding_type == "rope":
            # megatron's table for a static cache covers max_sequence_length positions.
            freqs = gpt.rotary_pos_emb(cache.max_sequence_length)
            from megatron.core.transformer.attention import _yarn_get_concentration_factor_from_config

            mscale = _yarn_get_concentration_factor_from_config(gpt.config)
            self.cos, self.sin = torch.cos(freqs) * mscale, torch.sin(freqs) * mscale
        self.keys, self.values = [], []
        for layer in self.layers:  # take over megatron's cache: it is not used again
            keys, values = cache.key_value_memory_dict.pop(layer.layer_number)
            self.keys.append(self._new_cache(keys, self._rope(keys[:length], 0, length)))
            self.values.append(self._new_cache(values, values[:length]))

    def _new_cache(self, megatron_cache: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        """Our cache for megatron's ``[capacity, batch, groups, head_dim]``, starting with ``filled`` (same layout)."""
        capacity, batch = megatron_cache.shape[:2]
        cache = megatron_cache.new_empty(batch, self.heads, capacity, self.head_dim)
        cache[:, :, : len(filled)] = self._repeat(filled).permute(1, 2, 0, 3)
        return cache

    def _repeat(self, groups: torch.Tensor) -> torch.Tensor:
        """``[..., groups, head_dim]`` to ``[..., heads, head_dim]`` as megatron's ``repeat_interleave`` on dim -2."""
        per_group = self.heads // self.groups
        if per_group == 1:
            return groups
        expanded = groups.unsqueeze(-2).expand(*groups.shape[:-1], per_group, self.head_dim)
        return expanded.reshape(*groups.shape[:-2], self.heads, self.head_dim)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop from the cache every batch row not listed in ``rows``."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]

    def _rope(self, t: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """megatron's unfused RoPE (``_apply_rotary_pos_emb_bshd``) of ``t`` ``[s, ...]`` at positions start..end-1."""
        if self.cos is None:
            return t
        cos, sin = self.cos[start:end], self.sin[start:end]
        rot_dim = cos.shape[-1]
        if rot_dim == t.shape[-1]:
            first, second = torch.chunk(t, 2, dim=-1)
            return (t * cos) + (torch.cat((-second, first), dim=-1) * sin)
        t, t_pass = t[..., :rot_dim], t[..., rot_dim:]
        first, second = torch.chunk(t, 2, dim=-1)
        t = (t * cos) + (torch.cat((-second, first), dim=-1) * sin)
        return torch.cat((t, t_pass), dim=-1)

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """float32 logits ``[B, V]`` after feeding ``tokens`` ``[B]`` at position ``pos`` (cache filled below it)."""
        gpt = self.gpt
        hidden = gpt.embedding.word_embeddings.weight[tokens][None]  # [1, B, H]
        if gpt.position_embedding_type == "learned_absolute":
            hidden = hidden + gpt.embedding.position_embeddings.weight[pos]
        for index, layer in enumerate(self.layers):
            hidden = self._attention(layer, hidden, pos, index)
            mlp = layer.mlp
            x, bias = _linear(mlp.linear_fc1, layer.pre_mlp_layernorm(hidden))
            if bias is not None:
                x = x + bias
            if mlp.config.gated_linear_unit:
                x_glu, x_linear = torch.chunk(x, 2, dim=-1)
                x = mlp.config.activation_func(x_glu) * (x_linear + mlp.config.glu_linear_offset)
            else:
                x = mlp.activation_func(x)
            hidden = _bias_add(*_linear(mlp.linear_fc2, x), hidden)
        hidden = gpt.decoder.final_layernorm(hidden)
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        logits, _ = _linear(gpt.output_layer, hidden, weight)
        return logits[0].float()

    def _attention(self, layer: TransformerLayer, hidden: torch.Tensor, pos: int, index: int) -> torch.Tensor:
        """Self-attention and its residual, as megatron's ``SelfAttention`` + ``DotProductAttention`` compute it."""
        attention = layer.self_attention
        batch, groups, heads, head_dim = hidden.shape[1], self.groups, self.heads, self.head_dim
        per_group = heads // groups
        qkv, _ = _linear(attention.linear_qkv, layer.input_layernorm(hidden))
        # Each group's [queries, key, value] heads; RoPE is elementwise per head, so queries and key go together.
        qkv = qkv.view(batch, groups, per_group + 2, head_dim)
        query_key = self._rope(qkv[None, :, :, : per_group + 1], pos, pos + 1)[0]
        keys, values = self.keys[index], self.values[index]
        keys[:, :, pos] = self._repeat(query_key[:, :, per_group])
        values[:, :, pos] = self._repeat(qkv[:, :, per_group + 1])
        query = query_key[:, :, :per_group].reshape(batch * heads, 1, head_dim)
        keys = keys.view(batch * heads, -1, head_dim)[:, : pos + 1]
        values = values.view(batch * heads, -1, head_dim)[:, : pos + 1]
        core = attention.core_attention
        scores = torch.baddbmm(
            torch.empty(batch * heads, 1, pos + 1, dtype=query.dtype, device=query.device),
            query,
            keys.transpose(1, 2),
            beta=0.0,
            alpha=core.softmax_scale,
        )
        if core.scale_mask_softmax.scale is not None:
            scores = scores * core.scale_mask_softmax.scale
        context = torch.bmm(torch.softmax(scores, dim=-1), values)  # [batch * heads, 1, head_dim]
        context = context.view(1, batch, heads * head_dim)
        return _bias_add(*_linear(attention.linear_proj, context), hidden)
