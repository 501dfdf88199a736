"""Convert pre-Megatron-Core ("legacy", ``mcore_gpt: false``) NeMo GPT checkpoints to Megatron-Core names.

NVIDIA's GPT-2B-001 and other NeMo 1.x GPT releases store their weights under ``model.language_model.``
(``embedding.word_embeddings``, ``encoder.layers.{i}.self_attention.query_key_value``, ...), in one plain torch
state dict per model-parallel rank (``model_weights.ckpt``, ``mp_rank_XX/``, ``tp_rank_XX_pp_rank_YYY/``). This
module merges those ranks into one TP=1, PP=1 state dict and renames it to ``MegatronGPTModel``'s names
(``model.decoder.layers.{i}.self_attention.linear_qkv``, ...); ``scripts/checkpoint_converters/
convert_nemo_gpt_to_mcore.py`` does the file I/O.

Layout facts this relies on (NeMo's legacy ``ParallelAttention`` / ``ParallelMLP`` and its own legacy-to-mcore
converter, which maps every tensor one to one):

- ``query_key_value`` rows are ordered per attention head as ``[q, k, v]`` (``hn`` rows each): the output is
  viewed as ``[s, b, heads, 3 * hn]`` and split in three. That is megatron-core's ``linear_qkv`` layout with one
  query group per head (legacy NeMo GPT has no grouped-query attention). With ``megatron_legacy: true`` the rows
  are ``[3, heads, hn]`` instead (the output was transposed before the split) and are reordered here.
- ``fast-swiglu`` / ``fast-geglu``: ``dense_h_to_4h`` holds the activated (gate) rows then the linear (up) rows,
  as ``linear_fc1`` does. ``swiglu`` / ``geglu``: the gate is ``dense_h_to_4h`` and the up projection is a
  separate ``dense_h_to_4h_2``; ``linear_fc1`` is their concatenation.
- Under tensor parallelism each rank holds whole heads and, for gated MLPs, its own ``[gate; up]`` halves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nemo_aligner.checkpoint import nemo_file
from nemo_aligner.checkpoint.vocab import padded_vocab_size

logger = logging.getLogger(__name__)

LEGACY_PREFIX = "model.language_model."
_LAYER_KEY = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# Legacy activation name -> the name of the same function in the converted config.
_ACTIVATIONS = {
    "gelu": "gelu",
    "squared-relu": "squared-relu",
    "fast-swiglu": "fast-swiglu",
    "swiglu": "swiglu",
    "fast-geglu": "geglu",
    "geglu": "geglu",
}
_GATED_SPLIT = ("swiglu", "geglu")  # gate and up in two tensors (dense_h_to_4h, dense_h_to_4h_2)
_GATED_FUSED = ("fast-swiglu", "fast-geglu")  # one dense_h_to_4h holding [gate; up]
# Legacy config values that change the computation and have no megatron-core GPT counterpart here.
_UNSUPPORTED = {
    "transformer_block_type": ("pre_ln", None),
    "headscale": (False, None),
    "normalize_attention_scores": (True, None),
    "openai_gelu": (False, None),
    "multi_query_attention": (False, None),
    "transformer_engine": (False, None),
}
# Legacy-only keys dropped from the converted config.
_LEGACY_ONLY_KEYS = ("megatron_legacy",)

# Per legacy tensor (layer-relative name): how tensor-parallel shards combine. "rows"/"cols" = concatenate along
# dim 0/1; "gated" = per-shard [gate; up] halves; "same" = replicated on every rank.
_LAYER_TENSORS = {
    "input_layernorm.weight": ("input_layernorm.weight", "same"),
    "input_layernorm.bias": ("input_layernorm.bias", "same"),
    "self_attention.query_key_value.weight": ("self_attention.linear_qkv.weight", "rows"),
    "self_attention.query_key_value.bias": ("self_attention.linear_qkv.bias", "rows"),
    "self_attention.dense.weight": ("self_attention.linear_proj.weight", "cols"),
    "self_attention.dense.bias": ("self_attention.linear_proj.bias", "same"),
    "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", "same"),
    "post_attention_layernorm.bias": ("pre_mlp_layernorm.bias", "same"),
    "mlp.dense_h_to_4h.weight": ("mlp.linear_fc1.weight", "rows"),
    "mlp.dense_h_to_4h.bias": ("mlp.linear_fc1.bias", "rows"),
    "mlp.dense_h_to_4h_2.weight": (None, "rows"),  # the up half of a non-fused GLU, joined to linear_fc1
    "mlp.dense_h_to_4h_2.bias": (None, "rows"),
    "mlp.dense_4h_to_h.weight": ("mlp.linear_fc2.weight", "cols"),
    "mlp.dense_4h_to_h.bias": ("mlp.linear_fc2.bias", "same"),
}
_TOP_TENSORS = {
    "embedding.word_embeddings.weight": ("embedding.word_embeddings.weight", "rows"),
    "embedding.position_embeddings.weight": ("embedding.position_embeddings.weight", "same"),
    "encoder.final_layernorm.weight": ("decoder.final_layernorm.weight", "same"),
    "encoder.final_layernorm.bias": ("decoder.final_layernorm.bias", "same"),
    "output_layer.weight": ("output_layer.weight", "rows"),
    "rotary_pos_emb.inv_freq": (None, "same"),  # a buffer megatron-core recomputes; checked against the config
}
# With tied embeddings and PP > 1, legacy megatron keeps a copy of the word embeddings on the last stage.
_TIED_COPY = "model.word_embeddings.weight"


def is_legacy_gpt(cfg: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True for a legacy GPT checkpoint: weights named ``model.language_model.*`` (after O2-prefix stripping)."""
    return not cfg.get("mcore_gpt", False) and any(k.startswith(LEGACY_PREFIX) for k in state_dict)


def mcore_config_from_legacy(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The converted model config: ``mcore_gpt: true``, TP = PP = 1, activation names megatron-core knows.

    Raises ValueError naming the key for a legacy option the converted model could not reproduce.
    """
    out = dict(cfg)
    for key, allowed in _UNSUPPORTED.items():
        if out.get(key) not in allowed:
            raise ValueError(
                f"model_config.yaml: {key}={out.get(key)!r} is not supported by the legacy converter "
                f"(supported: {allowed[0]!r})"
            )
    activation = out.get("activation") or "gelu"
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"model_config.yaml: activation={activation!r} is not supported; supported: {sorted(_ACTIVATIONS)}"
        )
    position = out.get("position_embedding_type") or "learned_absolute"
    if position not in ("learned_absolute", "rope"):
        raise ValueError(
            f"model_config.yaml: position_embedding_type={position!r} is not supported; use learned_absolute or rope"
        )
    heads = out["num_attention_heads"]
    if (out.get("num_query_groups") or heads) != heads:
        raise ValueError("model_config.yaml: num_query_groups is set, but legacy GPT checkpoints have no GQA")
    for key in _LEGACY_ONLY_KEYS:
        out.pop(key, None)
    out.update(
        mcore_gpt=True,
        activation=_ACTIVATIONS[activation],
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
    )
    return out


def load_legacy_gpt_state_dict(unpacked_dir: str | Path, cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Read every rank's legacy weights file of an unpacked checkpoint and merge them into TP=1, PP=1.

    Keys keep their legacy names (``model.language_model...``) with global layer numbers; O2 prefixes
    (``model.module.``) are stripped. Raises NemoFormatError if a rank's file is missing.
    """
    tp = int(cfg.get("tensor_model_parallel_size") or 1)
    pp = int(cfg.get("pipeline_model_parallel_size") or 1)
    stages = []
    for pp_rank in range(pp):
        shards = [
            nemo_file.strip_o2_prefix(nemo_file.load_legacy_state_dict(unpacked_dir, tp_rank, pp_rank, tp, pp))
            for tp_rank in range(tp)
        ]
        stages.append(_merge_tp(shards, cfg))
    return _merge_pp(stages, cfg)


def _merge_tp(shards: list[dict[str, torch.Tensor]], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One pipeline stage's tensor-parallel shards as one state dict (legacy names, local layer numbers)."""
    keys = set(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if set(shard) != keys:
            raise ValueError(f"tensor-parallel rank {rank} holds other tensors than rank 0: {set(shard) ^ keys}")
    merged = {}
    for key in sorted(keys):
        tensors = [shard[key] for shard in shards]
        if key == _TIED_COPY:
            merged[key] = torch.cat(tensors)
            continue
        _, how = _legacy_entry(key)
        if cfg.get("megatron_legacy") and ".query_key_value." in key:
            tensors = [_qkv_from_megatron_legacy(t, cfg, len(shards)) for t in tensors]
        if how == "rows" and ".dense_h_to_4h." in key and (cfg.get("activation") in _GATED_FUSED):
            halves = [t.chunk(2, dim=0) for t in tensors]
            merged[key] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif how == "rows":
            merged[key] = torch.cat(tensors, dim=0)
        elif how == "cols":
            merged[key] = torch.cat(tensors, dim=1)
        else:
            merged[key] = tensors[0]
    return merged


def _qkv_from_megatron_legacy(tensor: torch.Tensor, cfg: Mapping[str, Any], tp: int) -> torch.Tensor:
    """Reorder one rank's ``[3, heads, hn]`` QKV rows (``megatron_legacy: true``) into ``[heads, 3, hn]``."""
    heads = cfg["num_attention_heads"] // tp
    rest = tensor.shape[1:]
    return tensor.reshape(3, heads, -1, *rest).transpose(0, 1).reshape(tensor.shape)


def _merge_pp(stages: list[dict[str, torch.Tensor]], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Renumber each pipeline stage's layers (stored from 0 per stage) globally and join the stages."""
    merged: dict[str, torch.Tensor] = {}
    offset = 0
    for stage in stages:
        layers = set()
        for key, value in stage.items():
            if key == _TIED_COPY:
                continue  # the first stage holds the same embedding
            rest = key[len(LEGACY_PREFIX) :]
            match = _LAYER_KEY.match(rest)
            if match:
                layers.add(int(match.group(1)))
                key = f"{LEGACY_PREFIX}encoder.layers.{int(match.group(1)) + offset}.{match.group(2)}"
            if key in merged:
                raise ValueError(f"{key} is stored by two pipeline stages")
            merged[key] = value
        offset += len(layers)
    if offset != cfg["num_layers"]:
        raise ValueError(
            f"the legacy weights hold {offset} layers, but model_config.yaml says num_layers={cfg['num_layers']}"
        )
    return merged


def _legacy_entry(key: str) -> tuple[str | None, str]:
    """(megatron-core name relative to ``model.``, TP merge rule) of a legacy key; ValueError if unknown."""
    if key.startswith(LEGACY_PREFIX):
        rest = key[len(LEGACY_PREFIX) :]
        match = _LAYER_KEY.match(rest)
        if match and match.group(2) in _LAYER_TENSORS:
            name, how = _LAYER_TENSORS[match.group(2)]
            return (None if name is None else f"decoder.layers.{match.group(1)}.{name}"), how
        if rest in _TOP_TENSORS:
            return _TOP_TENSORS[rest]
    raise ValueError(
        f"unexpected weight {key!r}: not a legacy NeMo GPT tensor (TransformerEngine-based legacy layers, "
        "adapters and virtual-pipeline checkpoints are not supported)"
    )


def mcore_state_dict_from_legacy(legacy: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a merged legacy state dict (TP=1, PP=1) to ``MegatronGPTModel`` names (``model.decoder...``).

    ``cfg`` is the legacy model config. A stored rotary ``inv_freq`` must match the one the config implies.
    """
    out: dict[str, torch.Tensor] = {}
    activation = cfg.get("activation") or "gelu"
    for key, value in legacy.items():
        if key == _TIED_COPY:
            continue
        name, _ = _legacy_entry(key)
        if key.endswith("rotary_pos_emb.inv_freq"):
            _check_inv_freq(value, cfg)
        elif ".dense_h_to_4h_2." in key:
            if activation not in _GATED_SPLIT:
                raise ValueError(f"{key} is stored, but activation={activation!r} has no second MLP input projection")
        elif ".dense_h_to_4h." in key and activation in _GATED_SPLIT:
            up = legacy.get(key.replace(".dense_h_to_4h.", ".dense_h_to_4h_2."))
            if up is None:
                raise ValueError(f"activation={activation!r} needs {key.replace('_4h.', '_4h_2.')}, which is missing")
            out[f"model.{name}"] = torch.cat([value, up])
        else:
            out[f"model.{name}"] = value
    return out


def _check_inv_freq(stored: torch.Tensor, cfg: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose stored RoPE frequencies differ from those the config gives megatron-core."""
    kv_channels = cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]
    dim = int(kv_channels * (cfg.get("rotary_percentage") or 1.0))
    base = cfg.get("rotary_base") or 10000
    expected = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if stored.shape != expected.shape or not torch.allclose(stored.double(), expected, rtol=1e-2):
        raise ValueError(
            f"rotary_pos_emb.inv_freq in the checkpoint does not match rotary_base={base}, "
            f"rotary_percentage={cfg.get('rotary_percentage', 1.0)}, kv_channels={kv_channels} of model_config.yaml"
        )


def vocab_override(cfg: Mapping[str, Any], stored_rows: int, tokenizer_vocab_size: int) -> int | None:
    """``override_vocab_size`` the converted TP=1 model needs to keep the stored embedding rows, or None.

    Legacy files padded the vocabulary for their own TP size, which TP=1 padding may not reproduce.
    """
    divisible_by = cfg.get("make_vocab_size_divisible_by") or 128
    return None if padded_vocab_size(tokenizer_vocab_size, divisible_by, 1) == stored_rows else stored_rows
