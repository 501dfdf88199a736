"""From a NeMo-style model config (``model_config.yaml`` keys) to megatron-core's ``TransformerConfig`` and specs.

The keys are those NeMo users know (``../docs/checkpoints.md`` lists them); values that a checkpoint leaves out
take NeMo's defaults, so ``.nemo`` files written by NeMo load with the architecture they were trained with.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.activations import squared_relu
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend

from nemo_aligner.models.nlp.gpt.attention import SDPADotProductAttention
from nemo_aligner.models.nlp.gpt.norms import Norm
from nemo_aligner.utils import mcore_compat

logger = logging.getLogger(__name__)

# activation name -> (function, gated linear unit)
ACTIVATIONS = {
    "gelu": (F.gelu, False),
    "geglu": (F.gelu, True),
    "swiglu": (F.silu, True),
    "fast-swiglu": (F.silu, True),
    "squared-relu": (squared_relu, False),
    "relu": (F.relu, False),
}
NORMALIZATIONS = {"layernorm": ("LayerNorm", False), "layernorm1p": ("LayerNorm", True), "rmsnorm": ("RMSNorm", False)}
POSITION_EMBEDDINGS = ("learned_absolute", "rope")
CHECKPOINT_GRANULARITIES = (None, "selective", "full")
CHECKPOINT_METHODS = ("uniform", "block")


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default)
    return default if value is None else value


def params_dtype(cfg: Mapping[str, Any]) -> torch.dtype:
    """Parameter dtype: bf16/fp16 weights only with ``megatron_amp_O2``; mixed precision keeps fp32 weights."""
    precision = str(_get(cfg, "precision", 32))
    if not cfg.get("megatron_amp_O2", False):
        return torch.float32
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def transformer_config_from_model_cfg(cfg: Mapping[str, Any], cpu_initialization: bool = True) -> TransformerConfig:
    """Build megatron-core's ``TransformerConfig`` from a NeMo model config.

    ``cpu_initialization``: draw the initial weights on the CPU, the same for every tensor-parallel layout (a fresh
    model); ``False`` allocates and initialises each rank's shard directly on its device (megatron's default), for a
    model whose weights are about to be overwritten by a checkpoint. See ``MegatronGPTModel`` for where it ends up.
    """
    activation = _get(cfg, "activation", "gelu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    normalization = _get(cfg, "normalization", "layernorm")
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"model.normalization={normalization!r} is not supported; choose one of {sorted(NORMALIZATIONS)}"
        )
    position = _get(cfg, "position_embedding_type", "learned_absolute")
    if position not in POSITION_EMBEDDINGS:
        raise ValueError(f"model.position_embedding_type={position!r} is not supported; choose {POSITION_EMBEDDINGS}")
    activation_func, gated = ACTIVATIONS[activation]
    norm_name, zero_centered = NORMALIZATIONS[normalization]
    hidden_size = cfg["hidden_size"]
    num_heads = cfg["num_attention_heads"]
    dtype = params_dtype(cfg)
    bias = _get(cfg, "bias", True)
    precision = str(_get(cfg, "precision", 32))
    return TransformerConfig(
        num_layers=cfg["num_layers"],
        hidden_size=hidden_size,
        ffn_hidden_size=_get(cfg, "ffn_hidden_size", 4 * hidden_size),
        num_attention_heads=num_heads,
        num_query_groups=cfg.get("num_query_groups") or num_heads,
        kv_channels=cfg.get("kv_channels") or hidden_size // num_heads,
        hidden_dropout=_get(cfg, "hidden_dropout", 0.1),
        attention_dropout=_get(cfg, "attention_dropout", 0.1),
        layernorm_epsilon=_get(cfg, "layernorm_epsilon", 1e-5),
        layernorm_zero_centered_gamma=zero_centered,
        normalization=norm_name,
        add_bias_linear=bias,
        add_qkv_bias=_get(cfg, "qkv_bias", bias),
        gated_linear_unit=gated,
        activation_func=activation_func,
        init_method_std=_get(cfg, "init_method_std", 0.02),
        apply_query_key_layer_scaling=_get(cfg, "apply_query_key_layer_scaling", False),
        attention_softmax_in_fp32=True,
        fp32_residual_connection=_get(cfg, "fp32_residual_connection", False),
        bias_activation_fusion=_get(cfg, "bias_activation_fusion", False),
        bias_dropout_fusion=_get(cfg, "bias_dropout_add_fusion", False),
        masked_softmax_fusion=_get(cfg, "masked_softmax_fusion", False),
        apply_rope_fusion=_get(cfg, "apply_rope_fusion", False),
        gradient_accumulation_fusion=_get(cfg, "gradient_accumulation_fusion", False),
        persist_layer_norm=False,
        tensor_model_parallel_size=_get(cfg, "tensor_model_parallel_size", 1),
        pipeline_model_parallel_size=_get(cfg, "pipeline_model_parallel_size", 1),
        sequence_parallel=_get(cfg, "sequence_parallel", False),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.startswith("bf16"),
        fp16=precision.startswith("16"),
        autocast_dtype=torch.bfloat16 if precision.startswith("bf16") else None,
        use_cpu_initialization=cpu_initialization,
        # Every loss function here returns (sum, count): megatron's schedules must not divide the sum in place
        # (its metrics share that tensor) before the optimizer is set up either (evaluation of a fresh model).
        calculate_per_token_loss=True,
        attention_backend=AttnBackend.auto if _use_te(cfg) else AttnBackend.local,
        batch_p2p_comm=_get(cfg, "batch_p2p_comm", True),
        deallocate_pipeline_outputs=False,
        **activation_recompute(cfg),
    )


def activation_recompute(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """NeMo's activation-checkpointing keys as megatron-core's ``recompute_*`` settings.

    ``activations_checkpoint_granularity``: ``null`` (store every activation), ``selective`` (recompute the core
    attention, megatron's ``recompute_modules=["core_attn"]``) or ``full`` (store only each group's input and rerun
    its layers in the backward pass); with ``full``, ``activations_checkpoint_method`` (``uniform``: groups of
    ``_num_layers`` layers; ``block``: the first ``_num_layers`` layers of each pipeline stage) and
    ``activations_checkpoint_num_layers`` are required. Method and layer count are ignored without a granularity,
    as in NeMo. The loss and gradients are those of a run without recompute (``tests/models/test_recompute.py``).
    """
    granularity = cfg.get("activations_checkpoint_granularity")
    if granularity not in CHECKPOINT_GRANULARITIES:
        raise ValueError(
            f"model.activations_checkpoint_granularity={granularity!r} is not supported; choose one of "
            f"{CHECKPOINT_GRANULARITIES}"
        )
    if granularity is None:
        return {}
    method, num_layers = cfg.get("activations_checkpoint_method"), cfg.get("activations_checkpoint_num_layers")
    if granularity == "selective":
        if num_layers is not None:
            raise ValueError(
                "model.activations_checkpoint_num_layers must be null with activations_checkpoint_granularity="
                f"selective (megatron-core recomputes the core attention of every layer), got {num_layers}"
            )
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    if method not in CHECKPOINT_METHODS:
        raise ValueError(
            f"model.activations_checkpoint_method={method!r}: with activations_checkpoint_granularity=full choose "
            f"one of {CHECKPOINT_METHODS}"
        )
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(
            f"model.activations_checkpoint_num_layers={num_layers!r}: with activations_checkpoint_granularity=full "
            "give a number of layers >= 1"
        )
    return {"recompute_granularity": "full", "recompute_method": method, "recompute_num_layers": num_layers}


def _use_te(cfg: Mapping[str, Any]) -> bool:
    wanted = bool(cfg.get("transformer_engine", False))
    if wanted and not mcore_compat.have_transformer_engine():
        logger.warning("model.transformer_engine=True but TransformerEngine is not importable: using the local spec")
        return False
    return wanted


def layer_spec(cfg: Mapping[str, Any], config: TransformerConfig):
    """The transformer-block spec: TransformerEngine's on request (and when importable), else the local one.

    The local spec is megatron-core's with its norms replaced by :class:`Norm` (zero-centred gamma and sequence
    parallelism work without apex or TE). ``model.local_core_attention: sdpa`` also replaces its core attention by
    PyTorch's fused attention where exact (:class:`SDPADotProductAttention`: faster on CPU, equal within float
    rounding); off by default because that rounding then differs between tensor-parallel layouts, so a run no
    longer reproduces bit for bit at another layout (``docs/performance.md``).
    """
    if _use_te(cfg):
        return mcore_compat.te_layer_spec()
    spec = copy.deepcopy(mcore_compat.get_gpt_layer_local_spec())
    spec.submodules.input_layernorm = Norm
    spec.submodules.pre_mlp_layernorm = Norm
    core_attention = cfg.get("local_core_attention") or "megatron"
    if core_attention not in ("megatron", "sdpa"):
        raise ValueError(f"model.local_core_attention: {core_attention!r} is not one of 'megatron', 'sdpa'")
    if core_attention == "sdpa":
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    num_layers = mcore_compat.get_num_layers_to_build(config)
    return mcore_compat.TransformerBlockSubmodules(layer_specs=[spec] * num_layers, layer_norm=Norm)
