"""DPO (and IPO, RPO, scale), full-parameter or LoRA, assembled: config checks, data, model (with its reference
policy, ``models/nlp/gpt/reference.py``), loop, optimizer (``run``)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_aligner.algorithms.dpo import DPOTrainer
from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataloader, build_dpo_datasets
from nemo_aligner.losses.preference import PREFERENCE_LOSSES
from nemo_aligner.models.nlp.gpt.lora import load_lora_adapters, merge_lora_adapters, save_lora_adapters
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.reference import REFERENCE_STRATEGIES, checkpoint_identity
from nemo_aligner.recipes.common import (
    TrainingData,
    assemble,
    config_view,
    data_parallel_layout,
    start_run,
    train,
    validate_common,
)
from nemo_aligner.utils.config import model_seed
from nemo_aligner.utils.config_validation import (
    ConfigChecker,
    check_batch_sizes,
    check_preference_loss,
    clamp_lengths_to_context,
)


def run(cfg: DictConfig) -> None:
    """Align ``pretrained_checkpoint.restore_from_path`` with ``cfg`` (``conf/gpt_dpo.yaml``)."""
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    started = start_run(cfg, "dpo", restore_path, validate_dpo_config)
    model_cfg = started.model_cfg
    data = build_dpo_data(cfg, model_cfg, restore_path)

    def configure_model(model: MegatronGPTDPOModel) -> None:
        configure_peft(model, model_cfg)
        model.reference.refresh(model)  # the initial weights are the reference

    def precompute_reference(loop: DPOTrainer) -> None:
        identity = {"model": checkpoint_identity(restore_path), "tokenizer": model_cfg.get("tokenizer")}
        loop.precompute_reference(
            Path(started.experiment.log_dir) / "reference_logprobs", {**identity, "data": model_cfg.data}
        )

    lora = uses_lora(model_cfg)
    loop = assemble(
        started,
        DPOTrainer,
        MegatronGPTDPOModel,
        data,
        configure_model=configure_model,
        before_resume=precompute_reference,
        nemo_fn=export_lora_run if lora else None,
    )

    def merge_lora() -> None:
        if lora and loop.step >= loop.max_steps:
            # The adapters were exported beside the checkpoints; the final .nemo is the merged, full model.
            merge_lora_and_save(loop.model, loop.ckpt_callback.final_nemo_path)

    train(started, loop, after_fit=merge_lora)


def validate_dpo_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """Every DPO config problem at once, before anything expensive."""
    view = config_view(cfg, model_cfg)
    checker = ConfigChecker(view)
    if not checker.get("pretrained_checkpoint.restore_from_path"):
        checker.add(
            "pretrained_checkpoint.restore_from_path",
            "is missing: name the SFT model to align (for the embedded default, the .nemo that train_gpt_sft.py wrote)",
        )
    data_parallel_size = validate_common(checker, "dpo", world_size)
    check_batch_sizes(checker, "model.micro_batch_size", "model.global_batch_size", data_parallel_size)
    checker.choice("model.dpo.preference_loss", PREFERENCE_LOSSES)
    checker.choice("model.dpo.reference", REFERENCE_STRATEGIES, required=False)
    checker.number("model.dpo.ref_policy_kl_penalty", minimum=0)
    checker.number("model.dpo.gt_reward_scale", required=False)
    check_preference_loss(checker, "model.dpo")
    checker.integer("model.dpo.log_prob_forward_micro_batch_size", minimum=1, required=False)
    checker.choice("model.peft.peft_scheme", ("none", "lora"), required=False)
    checker.choice("model.data.data_impl", ("jsonl", "packed_jsonl"), required=False)
    prefix = checker.get("model.data.data_prefix")
    if prefix is None or not hasattr(prefix, "get"):
        checker.add("model.data.data_prefix", "must be {train: [files], validation: [files], test: [files]}")
    else:
        for split in ("train", "validation"):
            checker.existing_files(f"model.data.data_prefix.{split}")
    checker.raise_if_any()
    placeholder = cfg.model.get("encoder_seq_length")
    clamp_lengths_to_context(cfg, ("model.data.seq_length",), int(model_cfg.encoder_seq_length), placeholder)
    with open_dict(model_cfg):
        model_cfg.data.seq_length = min(int(model_cfg.data.seq_length), int(model_cfg.encoder_seq_length))


def build_dpo_data(cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None) -> TrainingData:
    """Tokenizer, train/validation preference datasets (validated in full) and their dataloaders."""
    tokenizer, layout = data_parallel_layout(model_cfg, restore_path)
    gbs = int(model_cfg.global_batch_size)
    datasets = build_dpo_datasets(
        model_cfg.data,
        None,
        tokenizer,
        dpo_cfg=model_cfg.get("dpo"),
        splits=("train", "validation"),
        global_batch_size=gbs,
    )
    seed = model_seed(model_cfg)
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dpo_dataloader(
            model_cfg.data, datasets["train"], tokenizer, gbs, train=True, seed=seed, **layout
        ),
        val_dataloader=build_dpo_dataloader(
            model_cfg.data, datasets["validation"], tokenizer, gbs, train=False, **layout
        ),
    )


# ---------------------------------------------------------------------------------------------- LoRA runs
def uses_lora(model_cfg: DictConfig) -> bool:
    return (model_cfg.get("peft") or {}).get("peft_scheme", "none") == "lora"


def configure_peft(model, model_cfg: DictConfig) -> None:
    """Load the adapters ``model.peft.restore_from_path`` names into a LoRA model (built with its adapters from
    ``model.peft``), before its optimizer exists."""
    path = (model_cfg.get("peft") or {}).get("restore_from_path")
    if path:
        load_lora_adapters(model, path)


def export_lora_run(model, path: Path) -> None:
    """A LoRA run's export: the adapters alone (``<name>.lora/``), small and loadable onto the base model."""
    save_lora_adapters(model, Path(path).with_suffix(".lora"))


def merge_lora_and_save(model, path: Path) -> None:
    """Fold the adapters into the base weights and write a full ``.nemo`` that loads as a plain GPT."""
    merge_lora_adapters(model)
    model.save_to(path)
