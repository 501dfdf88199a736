"""NeMo-Aligner's config keys in this library: the ones that mean something else or nothing here, and keys added on
the command line that no code reads.

Every key of NeMo-Aligner's ``gpt_sft.yaml``, ``gpt_dpo.yaml``, ``gpt_spin.yaml`` and ``gpt_self_rewarding.yaml``
is in our YAML of the same name, so a ported ``key=value`` composes (``tests/compat/test_nemo_aligner_config_keys.py``
checks it against the recorded key lists). Most are read as NeMo-Aligner reads them; the rest are:

* aliases (:func:`apply_aliases`): ``trainer.max_steps``/``trainer.max_epochs`` set at the top level apply to the
  loop (``trainer.<loop>.*``, which the YAML interpolates them from); ``model.resume_from_checkpoint`` is
  ``exp_manager.resume_from_checkpoint``;
* without effect (:data:`NO_EFFECT`): each has the value this library behaves as; another value is accepted with
  one warning naming the key and why (:func:`warn_no_effect`).

A ``+key=value``/``++key=value`` adds a key Hydra does not know; :func:`check_added_keys` reports one that no code
reads (a typo such as ``+trainer.sft.max_stpes=5`` would otherwise train with the default quietly).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from nemo_aligner.utils.config_validation import ConfigError

logger = logging.getLogger(__name__)

_LOADER = "data loading is the library's own"
_ONE_SAMPLE_PER_ROW = "one sample per row here: no end-of-document position or mask resets"
_RUN_DATA_WINS = "the run's model.data always replaces the checkpoint's"


def _model_parallel_size(cfg: DictConfig) -> int:
    return int(cfg.model.get("tensor_model_parallel_size", 1) or 1) * int(
        cfg.model.get("pipeline_model_parallel_size", 1) or 1
    )


# key -> (the value this library behaves as, or a function of the config giving it; why another has no effect)
NO_EFFECT: dict[str, tuple[Any, str]] = {
    "trainer.logger": (False, "loggers come from exp_manager (create_*_logger)"),
    "trainer.enable_checkpointing": (False, "checkpoints are written by exp_manager's checkpoint_callback_params"),
    "trainer.use_distributed_sampler": (False, "the library's samplers shard the data across data-parallel ranks"),
    "exp_manager.create_checkpoint_callback": (True, "checkpoints are always written (trainer.<loop>.save_interval)"),
    "exp_manager.checkpoint_callback_params.model_parallel_size": (
        _model_parallel_size,
        "checkpoints are sharded by the model's own TP x PP",
    ),
    "exp_manager.checkpoint_callback_params.save_best_model": (False, "the best save_top_k are kept as checkpoints"),
    "model.save_nemo_on_validation_end": (
        False,
        "a .nemo with every checkpoint is exp_manager.checkpoint_callback_params.always_save_nemo here",
    ),
    "model.sync_batch_comm": (False, "pipeline communication is megatron-core's schedule"),
    "model.gradient_as_bucket_view": (False, "megatron-core's DDP always keeps gradients in its buckets"),
    "model.use_flash_attention": (None, "the attention kernel follows the layer spec (TransformerEngine on a GPU)"),
    "model.ffn_dropout": (0.0, "megatron-core has no separate MLP dropout: model.hidden_dropout applies"),
    "model.steerlm2.forward_micro_batch_size": (1, "SteerLM 2 is not part of this library"),
    "model.steerlm2.micro_batch_size": (1, "SteerLM 2 is not part of this library"),
    "model.peft.restore_from_ckpt.checkpoint_dir": (None, "adapters load from model.peft.restore_from_path"),
    "model.peft.restore_from_ckpt.checkpoint_name": (None, "adapters load from model.peft.restore_from_path"),
    "model.peft.lora_tuning.weight_tying": (False, "each layer has its own LoRA adapters"),
    "model.peft.lora_tuning.position_embedding_strategy": (None, "each layer has its own LoRA adapters"),
    "model.data.skip_warmup": (True, "no memory-mapped index to warm up"),
    "model.data.index_mapping_dir": (None, "no index files are written (the data is read into memory)"),
    "model.data.reset_position_ids": (False, _ONE_SAMPLE_PER_ROW),
    "model.data.reset_attention_mask": (False, _ONE_SAMPLE_PER_ROW),
    "model.data.eod_mask_loss": (False, _ONE_SAMPLE_PER_ROW),
    "model.data.dataloader_type": ("single", _LOADER),
    "model.overwrite_base_config.data.data_prefix": (True, _RUN_DATA_WINS),
    "model.overwrite_base_config.data.train_ds.file_path": (True, _RUN_DATA_WINS),
    "model.overwrite_base_config.data.validation_ds.file_path": (True, _RUN_DATA_WINS),
    "precision": (lambda cfg: cfg.trainer.get("precision"), "the model's precision is model.precision"),
    "model.data.validation_ds.micro_batch_size": (
        lambda cfg: cfg.model.get("micro_batch_size"),
        "validation runs in micro batches of model.micro_batch_size (a micro batch size changes memory, not results)",
    ),
}
for _split in ("train_ds", "validation_ds"):
    NO_EFFECT[f"model.data.{_split}.memmap_workers"] = (None, f"{_LOADER} (model.data.num_workers)")
    NO_EFFECT[f"model.data.{_split}.index_mapping_dir"] = (None, "no index files are written (data read into memory)")
    NO_EFFECT[f"model.data.{_split}.output_original_text"] = (True, "the original text is always kept")

# Keys a checkpoint's model config may hold that this library reads (models/nlp/gpt/model_config.py and the model);
# a ``++model.<key>=...`` for one of them is not a typo even when the YAML lacks it.
MODEL_KEYS_READ = frozenset(
    """activation activations_checkpoint_granularity activations_checkpoint_method activations_checkpoint_num_layers
    apply_query_key_layer_scaling apply_rope_fusion attention_dropout batch_p2p_comm bias bias_activation_fusion
    bias_dropout_add_fusion context_parallel_size encoder_seq_length ffn_hidden_size fp32_residual_connection
    gradient_accumulation_fusion hidden_dropout hidden_size init_method_std kv_channels layernorm_epsilon
    local_core_attention make_vocab_size_divisible_by masked_softmax_fusion max_position_embeddings mcore_gpt
    megatron_amp_O2 megatron_legacy normalization num_attention_heads num_layers num_query_groups
    override_vocab_size position_embedding_type precision qkv_bias rotary_base rotary_percentage
    scale_positional_embedding seq_len_interpolation_factor share_embeddings_and_output_weights tokenizer
    transformer_engine use_cpu_initialization virtual_pipeline_model_parallel_size attention_backend
    rope_scaling_factor""".split()
)

# Keys read where a config file may lack them (optimizer options, the Lightning strategy, LoRA refused outside
# SFT/DPO).
OTHER_KEYS_READ = frozenset(
    ("model.optim.eps", "model.optim.overlap_param_sync", "trainer.strategy", "model.peft.peft_scheme")
)

# Keys every data split (``model.data.<split>.<key>``) of SFT, SPIN and Self-Rewarding reads with a default
# (``data/nlp/loading.py``'s ``SPLIT_DEFAULTS``) although NeMo-Aligner's YAMLs, and ours, leave them out.
SPLIT_KEYS_READ = frozenset(("sep_id", "pad_length_to_multiple_of"))
DATA_SPLITS = ("train_ds", "validation_ds", "test_ds")

# Sections whose keys are passed on as they are (to W&B, the tokenizer, Hydra), so any key there is read.
OPEN_SECTIONS = ("hydra.", "exp_manager.wandb_logger_kwargs.", "model.tokenizer.", "model.ub_tp_comm_overlap_cfg.")


# ---------------------------------------------------------------------------------------------- aliases
def apply_aliases(cfg: DictConfig, loop: str) -> None:
    """NeMo-Aligner's alternative spellings, applied to ``cfg`` before any check reads it (see the module doc)."""
    loop_cfg = cfg.trainer.get(loop)
    for key in ("max_steps", "max_epochs"):
        top = cfg.trainer.get(key)
        if loop_cfg is not None and top is not None and top != loop_cfg.get(key):
            logger.info("trainer.%s=%s applies to the loop (trainer.%s.%s)", key, top, loop, key)
            with open_dict(loop_cfg):
                loop_cfg[key] = top
    model_resume = cfg.get("model", {}).get("resume_from_checkpoint")
    if model_resume and "exp_manager" in cfg:
        explicit = cfg.exp_manager.get("resume_from_checkpoint")
        if explicit and explicit != model_resume:
            raise ConfigError(
                f"model.resume_from_checkpoint={model_resume} and exp_manager.resume_from_checkpoint={explicit} "
                "disagree: set one of them"
            )
        with open_dict(cfg.exp_manager):
            cfg.exp_manager.resume_from_checkpoint = model_resume


# ---------------------------------------------------------------------------------------------- no effect
def warn_no_effect(cfg: DictConfig) -> list[str]:
    """One warning per NeMo-Aligner key set to a value this library does not act on; returns the keys."""
    warned = []
    for key, (behaves_as, reason) in NO_EFFECT.items():
        if OmegaConf.select(cfg, key, default="<absent>") == "<absent>":
            continue
        value = OmegaConf.select(cfg, key)
        expected = behaves_as(cfg) if callable(behaves_as) else behaves_as
        if _plain(value) != expected:
            logger.warning("%s=%s has no effect here (this library behaves as %s): %s", key, value, expected, reason)
            warned.append(key)
    return warned


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


# ---------------------------------------------------------------------------------------------- added keys
def added_keys(overrides: Iterable[str]) -> list[str]:
    """The keys of ``+key=value`` and ``++key=value`` overrides (Hydra's syntax for keys a config may lack)."""
    keys = []
    for override in overrides:
        if override.startswith("+") and "=" in override:
            key = override.lstrip("+").split("=", 1)[0]
            if not key.startswith("hydra") and "@" not in key:
                keys.append(key.lstrip("~"))
    return keys


def check_added_keys(base: DictConfig, overrides: Sequence[str]) -> None:
    """Report ``+``/``++`` keys that no code reads, against ``base`` (the config composed without them).

    A key of ``base`` (``++`` setting an existing key), of :data:`NO_EFFECT` or :data:`OTHER_KEYS_READ`, a data
    split's key of :data:`SPLIT_KEYS_READ` (where the config has that split), under an
    :data:`OPEN_SECTIONS` section or read from a model config (:data:`MODEL_KEYS_READ`) is read. Any other key is a
    :class:`ConfigError` naming it and the known keys it is closest to, except a ``model.<key>`` with no close
    match, which a checkpoint's NeMo model config may hold: that one is a warning (no code here reads it).
    """
    known = key_paths(OmegaConf.to_container(base, resolve=False))
    known |= set(NO_EFFECT) | OTHER_KEYS_READ | {f"model.{key}" for key in MODEL_KEYS_READ}
    splits = [split for split in DATA_SPLITS if OmegaConf.select(base, f"model.data.{split}") is not None]
    known |= {f"model.data.{split}.{key}" for split in splits for key in SPLIT_KEYS_READ}
    errors = []
    for key in added_keys(overrides):
        if key in known or key.startswith(OPEN_SECTIONS):
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.85)
        hint = f" (did you mean {' or '.join(close)}?)" if close else ""
        if not close and key.count(".") == 1 and key.startswith("model."):
            logger.warning("+%s: no code of this library reads this model config key; it has no effect", key)
            continue
        errors.append(f"{key}: no code reads this key, so setting it would have no effect{hint}")
    if errors:
        lines = "\n  ".join(errors)
        raise ConfigError(f"{len(errors)} unknown key(s) added with + or ++:\n  {lines}")


def key_paths(node: dict, prefix: str = "") -> set[str]:
    """Every key path of a nested mapping, sections included."""
    keys = set()
    for name, value in node.items():
        keys.add(f"{prefix}{name}")
        if isinstance(value, dict):
            keys |= key_paths(value, f"{prefix}{name}.")
    return keys
