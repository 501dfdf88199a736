"""SPIN, assembled: config checks, data (prompts with ground truth, a pairs loader), model, loop, optimizer
(``run``). Self-Rewarding (``self_rewarding.py``) shares the checks and the data."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_aligner.algorithms.spin import SPINTrainer
from nemo_aligner.data.nlp.builders import (
    build_collate,
    build_dataloader,
    build_sft_dataset,
    build_validation_sampler,
    num_samples_for,
)
from nemo_aligner.data.nlp.collate import resolve_pad_id
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.data.nlp.jsonl import check_global_batch_fits
from nemo_aligner.data.nlp.pairs import SPINBatchSampler, SPINPairsDataset
from nemo_aligner.generation import LengthParams, SamplingParams
from nemo_aligner.losses.preference import PREFERENCE_LOSSES
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.models.nlp.gpt.reference import REFERENCE_STRATEGIES
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
    """SPIN of ``pretrained_checkpoint.restore_from_path`` with ``cfg`` (``conf/gpt_spin.yaml``)."""
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    started = start_run(cfg, "spin", restore_path, validate_spin_config)
    data = build_spin_data(cfg, started.model_cfg, restore_path, max_steps=cfg.trainer.spin.max_steps)
    loop = assemble(
        started,
        SPINTrainer,
        MegatronGPTSPINModel,
        data,
        configure_model=start_reference,
        sft_dataset=data.sft_train_dataset,
        rollout_dir=Path(started.experiment.log_dir) / "spin_rollouts",
        seed=model_seed(started.model_cfg),
    )
    train(started, loop)


def start_reference(model: MegatronGPTSPINModel) -> None:
    """The initial weights are the first iteration's reference."""
    model.reference.refresh(model)


def validate_spin_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int, loop: str = "spin") -> None:
    """Every SPIN (and Self-Rewarding) config problem at once, before anything expensive."""
    view = config_view(cfg, model_cfg)
    checker = ConfigChecker(view)
    if not checker.get("pretrained_checkpoint.restore_from_path"):
        checker.add("pretrained_checkpoint.restore_from_path", "is missing: name the model to align")
    data_parallel_size = validate_common(checker, loop, world_size)
    checker.integer(f"trainer.{loop}.max_iterations", minimum=1)
    check_batch_sizes(checker, "model.micro_batch_size", "model.global_batch_size", data_parallel_size)
    checker.choice("model.spin.preference_loss", PREFERENCE_LOSSES)
    checker.choice("model.spin.reference", REFERENCE_STRATEGIES, required=False)
    checker.integer("model.spin.rollout_micro_batch_size", minimum=1)
    checker.integer("model.spin.log_prob_forward_micro_batch_size", minimum=1, required=False)
    penalty = checker.get("model.spin.ref_policy_kl_penalty")
    iterations = checker.get(f"trainer.{loop}.max_iterations")
    if hasattr(penalty, "__len__") and not isinstance(penalty, str):
        if isinstance(iterations, int) and len(penalty) < iterations:
            checker.add(
                "model.spin.ref_policy_kl_penalty",
                f"has {len(penalty)} values but trainer.{loop}.max_iterations is {iterations}: give one per iteration",
            )
    else:
        checker.number("model.spin.ref_policy_kl_penalty", minimum=0)
    check_preference_loss(checker, "model.spin")
    for key, parser in (("sampling_params", SamplingParams), ("length_params", LengthParams)):
        try:
            parser.from_config(checker.get(f"model.spin.{key}") or {})
        except ValueError as err:
            checker.add(f"model.spin.{key}", str(err))
    for split in ("train_ds", "validation_ds"):
        checker.existing_files(f"model.data.{split}.file_path")
    if checker.get("model.data.sample") and (checker.get(f"trainer.{loop}.max_steps", -1) or -1) <= 0:
        checker.add(
            "model.data.sample", f"needs trainer.{loop}.max_steps > 0 (the number of samples is max_steps x GBS)"
        )
    checker.raise_if_any()
    context = int(model_cfg.encoder_seq_length)
    keys = ("model.data.train_ds.max_seq_length", "model.data.validation_ds.max_seq_length")
    clamp_lengths_to_context(cfg, keys, context, placeholder=cfg.model.get("encoder_seq_length"))
    clamp_lengths_to_context(model_cfg, ("spin.length_params.max_length",), context)


def build_spin_data(
    cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None, max_steps: int, pairs_cls=SPINPairsDataset
) -> TrainingData:
    """Prompts + ground truth (SFT data) for the rollouts, a loader of the iteration's pairs (``pairs_cls``: SPIN's,
    or Self-Rewarding's judged pairs), and the SFT validation loader."""
    tokenizer, layout = data_parallel_layout(model_cfg, restore_path)
    data_cfg = cfg.model.data
    train_cfg, val_cfg = data_cfg.train_ds, data_cfg.validation_ds
    gbs, seed = int(model_cfg.global_batch_size), model_seed(model_cfg)
    sft_train = build_sft_dataset(data_cfg, train_cfg, tokenizer, seed, num_samples_for(data_cfg, max_steps, gbs))
    val_ds = build_sft_dataset(data_cfg, val_cfg, tokenizer, seed)
    check_global_batch_fits(train_cfg.file_path, len(sft_train), gbs)
    pairs = pairs_cls(sft_train, resolve_pad_id(tokenizer))
    train_sampler = SPINBatchSampler(
        len(pairs),
        gbs,
        consumed_samples=0,
        seed=seed,
        shuffle=bool(train_cfg.get("shuffle", True)),
        drop_last=bool(train_cfg.get("drop_last", True)),
        **layout,
    )
    collate = DPOCollate(resolve_pad_id(tokenizer), None, int(model_cfg.encoder_seq_length))
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dataloader(pairs, train_sampler, collate, {"num_workers": 0}),
        val_dataloader=build_dataloader(
            val_ds,
            build_validation_sampler(val_cfg, val_ds, gbs, **layout),
            build_collate(val_cfg, tokenizer),
            data_cfg,
        ),
        sft_train_dataset=sft_train,
    )
