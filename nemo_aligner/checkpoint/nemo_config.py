"""The model config written into a `.nemo`, in the form NVIDIA NeMo 2.5's `MegatronGPTModel.restore_from` reads.

NeMo builds the model from `model_config.yaml` in OmegaConf struct mode and reads some keys without a default.
Compared with the config a model holds, the written one (checked against real NeMo by
`tests/interop/test_nemo_restores_our_files.py`):

- keeps every key, ours included (NeMo ignores keys it does not read), so this library reads it back as before;
- says `mcore_gpt: true`: our models are megatron-core GPTs, and NeMo's default (false) builds its legacy GPT;
- has `optim`: NeMo reads `optim.name` while building the model. A run's file has its own; a file written outside
  training (a conversion) gets a plain AdamW placeholder (no apex needed), which a NeMo training config replaces;
- has `use_cpu_initialization: true` unless set: it is how this library initialises weights, and with NeMo's
  default (false) NeMo calls `torch.cuda.set_device` while building, so no CPU could restore the file;
- says `attention_backend: local` unless set, for a model without TransformerEngine: the attention this library
  ran (megatron-core's own). NeMo's default, `auto`, asks for TransformerEngine's fused kernels;
- names NeMo's class in `target`, as NeMo writes it, unless a target is already set;
- has its tokenizer in NeMo's form (`nemo_aligner.tokenizers.nemo_tokenizer_config`), with a warning where NeMo
  would not rebuild the same tokenizer.

Keys NeMo reads with a default are left as they are: this library reads them with NeMo's defaults
(`models/nlp/gpt/model_config.py`), so both sides build the same architecture from the same file.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_aligner.tokenizers import Tokenizer, nemo_tokenizer_config

NEMO_GPT_TARGET = "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"
# The `optim` NeMo needs to build a model that was never trained here (a conversion): torch's AdamW.
PLACEHOLDER_OPTIM = {"name": "adamw", "lr": 1e-4}


def config_for_nemo(model_cfg: DictConfig | dict, tokenizer: Tokenizer) -> tuple[DictConfig, dict[str, str]]:
    """The config to store in a `.nemo` for a model with this config and tokenizer, and the tokenizer files that
    travel with it (dotted config key -> local file, as `nemo_file.save_nemo` takes them)."""
    # A DictConfig is resolved where it sits: `model.precision: ${trainer.precision}` needs its parent config.
    if not isinstance(model_cfg, DictConfig):
        model_cfg = OmegaConf.create(model_cfg)
    cfg: dict[str, Any] = OmegaConf.to_container(model_cfg, resolve=True)
    cfg["mcore_gpt"] = True
    if not cfg.get("optim"):
        cfg["optim"] = dict(PLACEHOLDER_OPTIM)
    if cfg.get("use_cpu_initialization") is None:
        cfg["use_cpu_initialization"] = True
    if not cfg.get("transformer_engine"):
        cfg.setdefault("attention_backend", "local")
    cfg.setdefault("target", NEMO_GPT_TARGET)
    artifacts: dict[str, str] = {}
    if cfg.get("tokenizer") is not None:
        cfg["tokenizer"], tokenizer_files = nemo_tokenizer_config(cfg["tokenizer"], tokenizer)
        artifacts = {f"tokenizer.{key}": path for key, path in tokenizer_files.items()}
    return OmegaConf.create(cfg), artifacts
