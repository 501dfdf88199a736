"""Convert between Hugging Face Llama-style checkpoints and NeMo (megatron-core) GPT configs and weights.

Pure functions on plain dicts and tensors; the scripts in ``scripts/checkpoint_converters/`` do the file I/O.
Supported Hugging Face architectures: ``LlamaForCausalLM``, ``MistralForCausalLM`` and ``Qwen2ForCausalLM``
(RMSNorm, SwiGLU MLP, rotary embeddings, grouped-query attention; Qwen2 adds biases to q/k/v only).
``GPT2LMHeadModel`` is not supported: its ``gelu_new`` (tanh approximation) activation has no exact megatron
counterpart here (``gelu`` is the exact erf form), so converted logits would not match.

Weight names on the NeMo side are those of ``MegatronGPTModel`` with the local layer spec (see
``shared/design/nemo_format.md``). The fused ``linear_qkv`` weight holds, per query group, the q rows of that
group's heads followed by the group's k rows and v rows; ``linear_fc1`` holds the gate rows then the up rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from nemo_aligner.checkpoint.vocab import padded_vocab_size

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# Hugging Face rope types that megatron's RoPE reproduces: "default" as is, "linear" through
# ``seq_len_interpolation_factor`` (positions divided by the factor, the same as HF's inverse frequencies / factor).
SUPPORTED_ROPE_TYPES = ("default", "linear")
_PRECISION_BY_DTYPE = {"float32": 32, "bfloat16": "bf16", "float16": 16}
_DTYPE_BY_PRECISION = {"32": "float32", "bf16": "bfloat16", "16": "float16"}
# Buffers that old ``pytorch_model.bin`` files carry and that are recomputed, not loaded.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_parameters(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """Rope settings from transformers 5.x ``rope_parameters`` or 4.x ``rope_theta`` + ``rope_scaling``."""
    params = dict(hf_config.get("rope_parameters") or {})
    legacy_scaling = hf_config.get("rope_scaling") or {}
    for key, value in legacy_scaling.items():
        params.setdefault("rope_type" if key == "type" else key, value)
    if "rope_theta" not in params:
        params["rope_theta"] = hf_config.get("rope_theta", 10000.0)
    params.setdefault("rope_type", "default")
    return params


def _required(hf_config: Mapping[str, Any], key: str) -> Any:
    if hf_config.get(key) is None:
        raise ValueError(f"config.json: required key {key!r} is missing")
    return hf_config[key]


def _smallest_exact_divisor(hf_vocab_size: int, tokenizer_vocab_size: int) -> int:
    """Smallest ``d`` dividing ``hf_vocab_size`` with ``d > hf_vocab_size - tokenizer_vocab_size``.

    Then rounding ``tokenizer_vocab_size`` up to a multiple of ``d`` gives exactly ``hf_vocab_size``.
    """
    gap = hf_vocab_size - tokenizer_vocab_size
    return next(d for d in range(gap + 1, hf_vocab_size + 1) if hf_vocab_size % d == 0)


def hf_architecture(hf_config: Mapping[str, Any]) -> str:
    """The single supported ``architectures`` entry of an HF config; ValueError naming it and the supported list."""
    architectures = list(hf_config.get("architectures") or [])
    if len(architectures) != 1 or architectures[0] not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise ValueError(f"config.json: architectures={architectures} is not supported; supported: {supported}")
    return architectures[0]


def nemo_config_from_hf(hf_config: Mapping[str, Any], tokenizer_vocab_size: int | None = None) -> dict[str, Any]:
    """The NeMo model config (``model_config.yaml`` keys, without ``tokenizer``) for an HF ``config.json``.

    Vocabulary: ``MegatronGPTModel`` sizes its embedding from the tokenizer, rounded up to a multiple of
    ``make_vocab_size_divisible_by * TP``. The value chosen is the smallest divisor ``d`` of the HF
    ``vocab_size`` that rounds ``tokenizer_vocab_size`` (default: the HF ``vocab_size``) up to exactly the HF
    ``vocab_size``: ``d = 1`` when both agree; e.g. Qwen2's 151,646 tokenizer ids in a 151,936-row embedding give
    ``d = 1187``. At tensor parallel size ``t`` the embedding keeps exactly the HF rows whenever ``t * d`` divides
    the HF ``vocab_size`` (for ``d = 1``: ``t`` divides it, so TP=2 for every even vocabulary); otherwise it
    gains zero rows, which :func:`nemo_state_dict_from_hf` adds.

    Rope: ``rope_theta`` becomes ``rotary_base``; ``linear`` scaling becomes ``seq_len_interpolation_factor``;
    other scaling types (``llama3``, ``yarn``, ``dynamic``, ...) raise ValueError because ``MegatronGPTModel``
    cannot reproduce them. A sliding attention window (Mistral v0.1, Qwen2 with ``use_sliding_window``) is exact
    only for sequences that fit in it, so ``encoder_seq_length`` is capped at the window.
    """
    architecture = hf_architecture(hf_config)
    if hf_config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json: hidden_act={hf_config['hidden_act']!r} is not supported; expected 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if hf_config.get(key):
            raise ValueError(f"config.json: {key}=true is not supported (megatron has no bias for that alone)")

    rope = _rope_parameters(hf_config)
    if rope["rope_type"] not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"config.json: rope scaling type {rope['rope_type']!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )

    hf_vocab_size = int(_required(hf_config, "vocab_size"))
    tokenizer_vocab_size = hf_vocab_size if tokenizer_vocab_size is None else tokenizer_vocab_size
    if tokenizer_vocab_size > hf_vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab_size} ids but config.json vocab_size is {hf_vocab_size}: the model "
            "has no embedding rows for the extra ids"
        )

    num_heads = int(_required(hf_config, "num_attention_heads"))
    hidden_size = int(_required(hf_config, "hidden_size"))
    max_positions = int(_required(hf_config, "max_position_embeddings"))
    seq_length = max_positions
    window = hf_config.get("sliding_window")
    uses_window = hf_config.get("use_sliding_window", True) if architecture == "Qwen2ForCausalLM" else True
    if uses_window and window is not None and window < max_positions:
        logger.warning(
            "config.json: sliding_window=%d is not reproduced; encoder_seq_length is capped at it (exact up to there)",
            window,
        )
        seq_length = int(window)

    dtype = str(hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32")
    if dtype not in _PRECISION_BY_DTYPE:
        raise ValueError(f"config.json: dtype={dtype!r} is not supported; expected one of {list(_PRECISION_BY_DTYPE)}")

    cfg: dict[str, Any] = {
        "mcore_gpt": True,
        "num_layers": int(_required(hf_config, "num_hidden_layers")),
        "hidden_size": hidden_size,
        "ffn_hidden_size": int(_required(hf_config, "intermediate_size")),
        "num_attention_heads": num_heads,
        "num_query_groups": int(hf_config.get("num_key_value_heads") or num_heads),
        "kv_channels": int(hf_config.get("head_dim") or hidden_size // num_heads),
        "encoder_seq_length": seq_length,
        "max_position_embeddings": max_positions,
        "position_embedding_type": "rope",
        "rotary_base": float(rope["rope_theta"]),
        "rotary_percentage": 1.0,
        "seq_len_interpolation_factor": float(rope["factor"]) if rope["rope_type"] == "linear" else None,
        "normalization": "rmsnorm",
        "layernorm_epsilon": float(_required(hf_config, "rms_norm_eps")),
        "activation": "fast-swiglu",
        "bias": False,
        "share_embeddings_and_output_weights": bool(hf_config.get("tie_word_embeddings", False)),
        "make_vocab_size_divisible_by": _smallest_exact_divisor(hf_vocab_size, tokenizer_vocab_size),
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
        "precision": _PRECISION_BY_DTYPE[dtype],
        "megatron_amp_O2": False,
        "transformer_engine": False,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "init_method_std": float(hf_config.get("initializer_range", 0.02)),
    }
    if architecture == "Qwen2ForCausalLM":
        cfg["qkv_bias"] = True
    return cfg


def _dims(nemo_cfg: Mapping[str, Any]) -> tuple[int, int, int]:
    """(attention heads, query groups, head dim) of a NeMo config."""
    num_heads = int(nemo_cfg["num_attention_heads"])
    num_groups = int(nemo_cfg.get("num_query_groups") or num_heads)
    head_dim = int(nemo_cfg.get("kv_channels") or int(nemo_cfg["hidden_size"]) // num_heads)
    return num_heads, num_groups, head_dim


def _interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int, head_dim: int) -> torch.Tensor:
    """Fuse HF q/k/v (weights ``[rows, h]`` or biases ``[rows]``) into megatron's per-group layout."""
    trailing = q.shape[1:]
    q = q.reshape(num_groups, -1, *trailing)
    k = k.reshape(num_groups, head_dim, *trailing)
    v = v.reshape(num_groups, head_dim, *trailing)
    return torch.cat([q, k, v], dim=1).reshape(-1, *trailing)


def _split_qkv(
    qkv: torch.Tensor, num_heads: int, num_groups: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`_interleave_qkv`."""
    trailing = qkv.shape[1:]
    q_rows = num_heads // num_groups * head_dim
    grouped = qkv.reshape(num_groups, q_rows + 2 * head_dim, *trailing)
    q, k, v = torch.split(grouped, [q_rows, head_dim, head_dim], dim=1)
    return tuple(t.reshape(-1, *trailing).clone() for t in (q, k, v))


def _pad_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    if rows == weight.shape[0]:
        return weight
    padding = weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, padding])


def _has_qkv_bias(nemo_cfg: Mapping[str, Any]) -> bool:
    return bool(nemo_cfg.get("qkv_bias", nemo_cfg.get("bias", True)))


def nemo_state_dict_from_hf(
    hf_state_dict: Mapping[str, torch.Tensor],
    nemo_cfg: Mapping[str, Any],
    padded_vocab: int | None = None,
) -> dict[str, torch.Tensor]:
    """``MegatronGPTModel`` weights (``model.*`` names, local spec) from an HF Llama/Mistral/Qwen2 state dict.

    ``padded_vocab`` is the model's embedding rows (``MegatronGPTModel.padded_vocab_size``); by default the HF
    ``vocab_size`` rounded up as ``nemo_cfg`` says, which is the model's for a config from
    :func:`nemo_config_from_hf`. Extra rows are zeros. Tensors keep their dtype. Raises ValueError naming any
    missing or unexpected HF key.
    """
    remaining = {k: v for k, v in hf_state_dict.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}

    def take(key: str) -> torch.Tensor:
        if key not in remaining:
            raise ValueError(f"HF state dict: missing weight {key!r}")
        return remaining.pop(key)

    num_heads, num_groups, head_dim = _dims(nemo_cfg)
    qkv_bias = _has_qkv_bias(nemo_cfg)
    tied = bool(nemo_cfg.get("share_embeddings_and_output_weights", True))

    embedding = take("model.embed_tokens.weight")
    hf_vocab = embedding.shape[0]
    if padded_vocab is None:
        multiple = int(nemo_cfg.get("make_vocab_size_divisible_by") or 128)
        padded_vocab = padded_vocab_size(hf_vocab, multiple, int(nemo_cfg.get("tensor_model_parallel_size") or 1))
    if padded_vocab < hf_vocab:
        raise ValueError(f"the model has {padded_vocab} embedding rows, fewer than the HF vocabulary ({hf_vocab})")

    out = {"model.embedding.word_embeddings.weight": _pad_rows(embedding, padded_vocab)}
    for i in range(int(nemo_cfg["num_layers"])):
        hf, nemo = f"model.layers.{i}.", f"model.decoder.layers.{i}."
        out[nemo + "input_layernorm.weight"] = take(hf + "input_layernorm.weight")
        q, k, v = (take(f"{hf}self_attn.{name}_proj.weight") for name in "qkv")
        out[nemo + "self_attention.linear_qkv.weight"] = _interleave_qkv(q, k, v, num_groups, head_dim)
        if qkv_bias:
            q, k, v = (take(f"{hf}self_attn.{name}_proj.bias") for name in "qkv")
            out[nemo + "self_attention.linear_qkv.bias"] = _interleave_qkv(q, k, v, num_groups, head_dim)
        out[nemo + "self_attention.linear_proj.weight"] = take(hf + "self_attn.o_proj.weight")
        out[nemo + "pre_mlp_layernorm.weight"] = take(hf + "post_attention_layernorm.weight")
        gate, up = take(hf + "mlp.gate_proj.weight"), take(hf + "mlp.up_proj.weight")
        out[nemo + "mlp.linear_fc1.weight"] = torch.cat([gate, up])
        out[nemo + "mlp.linear_fc2.weight"] = take(hf + "mlp.down_proj.weight")
    out["model.decoder.final_layernorm.weight"] = take("model.norm.weight")
    if tied:
        # transformers lists the tied head in state_dict(); save_pretrained leaves it out.
        remaining.pop("lm_head.weight", None)
    else:
        out["model.output_layer.weight"] = _pad_rows(take("lm_head.weight"), padded_vocab)
    if remaining:
        raise ValueError(
            f"HF state dict: unexpected weights {sorted(remaining)} for a {nemo_cfg['num_layers']}-layer model"
        )
    return out


def hf_state_dict_from_nemo(
    nemo_state_dict: Mapping[str, torch.Tensor], nemo_cfg: Mapping[str, Any], hf_vocab_size: int
) -> dict[str, torch.Tensor]:
    """The inverse of :func:`nemo_state_dict_from_hf`: HF Llama/Qwen2 weights, padded vocabulary rows dropped.

    ``lm_head.weight`` is written only for untied embeddings (as ``save_pretrained`` does). Tensors keep their
    dtype. Raises ValueError naming a missing NeMo key.
    """

    def get(key: str) -> torch.Tensor:
        if key not in nemo_state_dict:
            raise ValueError(f"NeMo state dict: missing weight {key!r}")
        return nemo_state_dict[key]

    num_heads, num_groups, head_dim = _dims(nemo_cfg)
    out = {"model.embed_tokens.weight": get("model.embedding.word_embeddings.weight")[:hf_vocab_size].clone()}
    for i in range(int(nemo_cfg["num_layers"])):
        hf, nemo = f"model.layers.{i}.", f"model.decoder.layers.{i}."
        out[hf + "input_layernorm.weight"] = get(nemo + "input_layernorm.weight")
        qkv = _split_qkv(get(nemo + "self_attention.linear_qkv.weight"), num_heads, num_groups, head_dim)
        out.update({f"{hf}self_attn.{name}_proj.weight": t for name, t in zip("qkv", qkv)})
        if _has_qkv_bias(nemo_cfg):
            qkv = _split_qkv(get(nemo + "self_attention.linear_qkv.bias"), num_heads, num_groups, head_dim)
            out.update({f"{hf}self_attn.{name}_proj.bias": t for name, t in zip("qkv", qkv)})
        out[hf + "self_attn.o_proj.weight"] = get(nemo + "self_attention.linear_proj.weight")
        out[hf + "post_attention_layernorm.weight"] = get(nemo + "pre_mlp_layernorm.weight")
        gate, up = get(nemo + "mlp.linear_fc1.weight").chunk(2)
        out[hf + "mlp.gate_proj.weight"], out[hf + "mlp.up_proj.weight"] = gate.clone(), up.clone()
        out[hf + "mlp.down_proj.weight"] = get(nemo + "mlp.linear_fc2.weight")
    out["model.norm.weight"] = get("model.decoder.final_layernorm.weight")
    if not nemo_cfg.get("share_embeddings_and_output_weights", True):
        out["lm_head.weight"] = get("model.output_layer.weight")[:hf_vocab_size].clone()
    return out


def _require(nemo_cfg: Mapping[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = nemo_cfg.get(key, default)
    if value not in allowed:
        raise ValueError(f"model.{key}={value!r} has no Llama/Qwen2 equivalent; expected one of {list(allowed)}")


def hf_config_from_nemo(
    nemo_cfg: Mapping[str, Any], vocab_size: int, bos_token_id: int | None, eos_token_id: int | None
) -> dict[str, Any]:
    """An HF ``config.json`` (``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` with a q/k/v bias) for a NeMo config.

    Rope settings use the transformers 4.x keys (``rope_theta``, ``rope_scaling``), which 5.x also reads.
    Raises ValueError naming the NeMo key when the architecture is not Llama-style.
    """
    _require(nemo_cfg, "position_embedding_type", ("rope",), "learned_absolute")
    _require(nemo_cfg, "normalization", ("rmsnorm",), "layernorm")
    _require(nemo_cfg, "activation", ("fast-swiglu", "swiglu"), "gelu")
    _require(nemo_cfg, "bias", (False,), True)
    _require(nemo_cfg, "rotary_percentage", (1.0,), 1.0)
    num_heads, num_groups, head_dim = _dims(nemo_cfg)
    qwen2 = _has_qkv_bias(nemo_cfg)
    precision = str(nemo_cfg.get("precision", 32)).removesuffix("-mixed")
    if precision not in _DTYPE_BY_PRECISION:
        raise ValueError(f"model.precision={precision!r} is not supported; expected one of {list(_DTYPE_BY_PRECISION)}")
    interpolation = nemo_cfg.get("seq_len_interpolation_factor")
    config: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if qwen2 else "llama",
        "vocab_size": vocab_size,
        "hidden_size": int(nemo_cfg["hidden_size"]),
        "intermediate_size": int(nemo_cfg["ffn_hidden_size"]),
        "num_hidden_layers": int(nemo_cfg["num_layers"]),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_groups,
        "head_dim": head_dim,
        "max_position_embeddings": int(nemo_cfg.get("max_position_embeddings") or nemo_cfg["encoder_seq_length"]),
        "rms_norm_eps": float(nemo_cfg.get("layernorm_epsilon", 1e-5)),
        "rope_theta": float(nemo_cfg.get("rotary_base", 10000)),
        "rope_scaling": {"rope_type": "linear", "factor": float(interpolation)} if interpolation else None,
        "hidden_act": "silu",
        "tie_word_embeddings": bool(nemo_cfg.get("share_embeddings_and_output_weights", True)),
        "initializer_range": float(nemo_cfg.get("init_method_std", 0.02)),
        "attention_dropout": 0.0,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "dtype": _DTYPE_BY_PRECISION[precision],
        "use_cache": True,
    }
    if not qwen2:
        config.update(attention_bias=False, mlp_bias=False)
    return config
