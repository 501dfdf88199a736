"""The glue every entry script shares (NeMo-Aligner's names, so custom pipelines port over).

Lightning's role is the launcher and environment: ``trainer.devices``/``num_nodes``, Slurm detection, the
process launch for ``devices=N`` on one node, loggers and the precision flag. It never wraps the model in its
own DDP and never runs a loop: megatron-core's DDP/optimizer and our trainers in ``nemo_aligner.algorithms`` do.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_aligner.utils.config import register_resolvers
from nemo_aligner.utils.config_validation import (
    ConfigChecker,
    check_batch_sizes,
    check_checkpoint_architecture,
    check_finite_numbers,
    check_loop,
    check_model_parallel,
    check_optimizer,
    check_preference_loss,
    check_resume_checkpoint,
    clamp_lengths_to_context,
)
from nemo_aligner.utils.distributed import RankInfo, initialize_distributed
from nemo_aligner.utils.exp_manager import CheckpointCallback, CustomLoggerWrapper, Experiment, RunTimer

logger = logging.getLogger(__name__)

# Keys of cfg.trainer that Lightning's Trainer receives; the rest (sft/dpo/spin/... loop settings) are ours.
LIGHTNING_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy")


def resolve_and_create_trainer(cfg: DictConfig, pop_trainer_key: str) -> Trainer:
    """Resolve the config, create the Lightning trainer and start the processes and process group.

    ``pop_trainer_key`` names the algorithm's loop section (``cfg.trainer.<key>``), which Lightning never sees.
    With ``trainer.devices=N`` and no external launcher (torchrun/srun), Lightning starts the other N-1
    processes here, re-running the same command.
    """
    register_resolvers()
    OmegaConf.resolve(cfg)
    if pop_trainer_key not in cfg.trainer:
        raise KeyError(f"trainer.{pop_trainer_key} is missing from the config")
    kwargs = {k: cfg.trainer[k] for k in LIGHTNING_TRAINER_KEYS if cfg.trainer.get(k) is not None}
    kwargs.setdefault("accelerator", "auto")
    kwargs.setdefault("devices", 1)
    world = int(kwargs.get("devices", 1) if kwargs["devices"] != "auto" else 1) * int(kwargs.get("num_nodes", 1))
    if world > 1:
        kwargs.setdefault("strategy", "ddp")
    # Lightning's start-up banner (accelerator summary, logger tips) is noise: our loggers are set up separately.
    banner = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = banner.level
    banner.setLevel(logging.WARNING)
    try:
        trainer = Trainer(
            **kwargs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            use_distributed_sampler=False,
        )
    finally:
        banner.setLevel(level)
    _launch_and_initialize(trainer)
    return trainer


def _launch_and_initialize(trainer: Trainer) -> None:
    """Start sibling processes if Lightning must (devices=N, no external launcher), then torch.distributed."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    environment = getattr(strategy, "cluster_environment", None)
    if launcher is not None and environment is not None and not environment.creates_processes_externally:
        launcher.launch(lambda: None)
    if environment is None:
        initialize_distributed()
        return
    strategy.set_world_ranks()
    initialize_distributed(
        rank_info=RankInfo(
            rank=environment.global_rank(),
            world_size=environment.world_size(),
            local_rank=environment.local_rank(),
            master_addr=environment.main_address,
            master_port=environment.main_port,
            source=type(environment).__name__,
        )
    )


def set_model_parallel_from_config(model_cfg: DictConfig) -> None:
    """Set up TP/PP groups for a model config before anything else needs them (e.g. data sharding)."""
    initialize_distributed(
        tensor_model_parallel_size=model_cfg.get("tensor_model_parallel_size", 1) or 1,
        pipeline_model_parallel_size=model_cfg.get("pipeline_model_parallel_size", 1) or 1,
        seed=model_cfg.get("seed", 1234),
    )


def override_model_config_from_checkpoint(cfg: DictConfig, checkpoint_cfg: DictConfig) -> DictConfig:
    """``cfg.model`` over the checkpoint's model config; ``encoder_seq_length`` always from the checkpoint."""
    from nemo_aligner.utils.utils import merge_over_checkpoint_config

    with open_dict(checkpoint_cfg):
        for key in ("target", "nemo_version"):
            checkpoint_cfg.pop(key, None)
        merged = merge_over_checkpoint_config(checkpoint_cfg, cfg.model)
        if "encoder_seq_length" in checkpoint_cfg:
            merged.encoder_seq_length = checkpoint_cfg.encoder_seq_length
    return merged


def to_plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value


def model_config_for_training(cfg: DictConfig, restore_path: str | None) -> DictConfig:
    """The model config a run uses: ``cfg.model`` over the checkpoint's config when restoring (NeMo-Aligner's
    ``load_and_override_model_config``), ``encoder_seq_length`` from the checkpoint."""
    if not restore_path:
        return OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    from nemo_aligner.utils.utils import load_checkpoint_model_config

    if not Path(restore_path).exists():
        raise FileNotFoundError(f"model checkpoint not found: {restore_path}")
    return override_model_config_from_checkpoint(cfg, load_checkpoint_model_config(restore_path))


def config_view(cfg: DictConfig, model_cfg: DictConfig) -> DictConfig:
    """The run's config with the effective model config, so checks report the key paths users write."""
    view = OmegaConf.create({k: v for k, v in cfg.items() if k != "model"})
    with open_dict(view):
        view.model = model_cfg
    return view


def validate_common(checker: ConfigChecker, loop: str, world_size: int) -> int:
    """Checks every algorithm shares; returns the data-parallel size."""
    check_finite_numbers(checker)
    check_loop(checker, loop)
    data_parallel_size = check_model_parallel(checker, "model", world_size)
    check_optimizer(checker, "model.optim")
    restore = checker.get("model.restore_from_path") or checker.get("pretrained_checkpoint.restore_from_path")
    if restore and not Path(restore).exists():
        checker.add("restore_from_path", f"checkpoint not found: {restore}")
    elif restore:
        check_checkpoint_architecture(checker, "model", restore)
    check_resume_checkpoint(checker, loop)
    max_time = checker.get("exp_manager.max_time_per_run")
    if max_time is not None:
        try:
            RunTimer(max_time)
        except ValueError as err:
            checker.add("exp_manager.max_time_per_run", str(err))
    return data_parallel_size


def validate_sft_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """Every SFT config problem at once, before anything expensive; over-long lengths are clamped."""
    view = config_view(cfg, model_cfg)
    checker = ConfigChecker(view)
    data_parallel_size = validate_common(checker, "sft", world_size)
    for split in ("train_ds", "validation_ds"):
        prefix = f"model.data.{split}"
        check_batch_sizes(checker, f"{prefix}.micro_batch_size", f"{prefix}.global_batch_size", data_parallel_size)
        checker.existing_files(f"{prefix}.file_path")
        checker.integer(f"{prefix}.max_seq_length", minimum=2)
        checker.choice(f"{prefix}.truncation_method", ("left", "right"), required=False)
    checker.boolean("model.data.chat")
    if checker.get("model.data.sample") and (checker.get("trainer.sft.max_steps", -1) or -1) <= 0:
        checker.add("model.data.sample", "needs trainer.sft.max_steps > 0 (the number of samples is max_steps x GBS)")
    checker.raise_if_any()
    context = int(model_cfg.encoder_seq_length)
    clamp_lengths_to_context(
        cfg, ("model.data.train_ds.max_seq_length", "model.data.validation_ds.max_seq_length"), context
    )


@dataclass
class TrainingData:
    tokenizer: Any
    train_dataloader: Any
    val_dataloader: Any
    sft_train_dataset: Any = None


def build_sft_data(cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None, max_steps: int) -> TrainingData:
    """Tokenizer, datasets (read and validated in full) and dataloaders; no model is built yet."""
    from megatron.core import parallel_state

    from nemo_aligner.data.nlp.builders import (
        build_collate,
        build_dataloader,
        build_sft_dataset,
        build_train_sampler,
        build_validation_sampler,
        num_samples_for,
    )
    from nemo_aligner.data.nlp.jsonl import check_global_batch_fits
    from nemo_aligner.utils.utils import build_tokenizer_for

    set_model_parallel_from_config(model_cfg)
    tokenizer = build_tokenizer_for(model_cfg, restore_path)
    data_cfg = cfg.model.data
    train_cfg, val_cfg = data_cfg.train_ds, data_cfg.validation_ds
    seed = int(model_cfg.get("seed", 1234))
    train_ds = build_sft_dataset(
        data_cfg, train_cfg, tokenizer, seed, num_samples_for(data_cfg, max_steps, train_cfg.global_batch_size)
    )
    val_ds = build_sft_dataset(data_cfg, val_cfg, tokenizer, seed)
    if train_cfg.get("drop_last", True):
        check_global_batch_fits(train_cfg.file_path, len(train_ds), train_cfg.global_batch_size)
    if val_cfg.get("drop_last", False):
        check_global_batch_fits(val_cfg.file_path, len(val_ds), val_cfg.global_batch_size)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    train_sampler = build_train_sampler(
        train_cfg,
        train_ds,
        train_cfg.global_batch_size,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
        seed=seed,
    )
    val_sampler = build_validation_sampler(
        val_cfg, val_ds, val_cfg.global_batch_size, data_parallel_rank=dp_rank, data_parallel_size=dp_size
    )
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dataloader(train_ds, train_sampler, build_collate(train_cfg, tokenizer), data_cfg),
        val_dataloader=build_dataloader(val_ds, val_sampler, build_collate(val_cfg, tokenizer), data_cfg),
    )


def build_model(model_cls, model_cfg: DictConfig, restore_path: str | None, trainer: Trainer, tokenizer):
    """Restore ``model_cls`` from ``restore_path`` with ``model_cfg``, or build it from scratch."""
    if restore_path:
        from nemo_aligner.utils.utils import load_from_nemo

        return load_from_nemo(model_cls, model_cfg, trainer, restore_path=restore_path, tokenizer=tokenizer)
    return model_cls(model_cfg, trainer, tokenizer=tokenizer)


def planned_max_steps(loop_cfg: DictConfig, steps_per_epoch: int) -> int:
    """The run's number of optimizer steps, as the loop will compute it (the LR schedule spans it)."""
    from nemo_aligner.algorithms.base import limited

    per_epoch = max(limited(steps_per_epoch, loop_cfg.get("limit_train_batches", 1.0)), 1)
    by_epochs = int(loop_cfg.get("max_epochs", 1)) * per_epoch
    max_steps = int(loop_cfg.get("max_steps", -1) or -1)
    return by_epochs if max_steps < 0 else min(max_steps, by_epochs)


def setup_model_and_trainer_state(
    trainer_cls,
    model_cls,
    cfg: DictConfig,
    loop_cfg: DictConfig,
    model_cfg: DictConfig,
    restore_path: str | None,
    trainer: Trainer,
    experiment: Experiment,
    log: CustomLoggerWrapper,
    data: TrainingData,
    total_steps: int | None = None,
    configure_model: Callable[[Any], None] | None = None,
    before_resume: Callable[[Any], None] | None = None,
    nemo_fn: Callable[[Any, Path], None] | None = None,
    **loop_kwargs: Any,
):
    """Build the model, its optimizer and LR schedule, the loop and its checkpoint callback; resume if asked.

    ``configure_model(model)`` runs before the optimizer is built (e.g. LoRA, a reference-policy copy);
    ``before_resume(loop)`` runs before a trainer checkpoint is loaded (e.g. precomputing reference log-probs with
    the initial weights). ``nemo_fn(model, path)`` exports the model (default: ``model.save_to(path)``).
    """
    model = build_model(model_cls, model_cfg, restore_path, trainer, data.tokenizer)
    if configure_model is not None:
        configure_model(model)
    steps = total_steps or planned_max_steps(loop_cfg, data.train_dataloader.batch_sampler.steps_per_epoch)
    optimizer, scheduler = model.setup_optimization(model_cfg.optim, steps, loop_cfg.get("gradient_clip_val", 0.0))
    loop = trainer_cls(
        cfg=loop_cfg,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_dataloader=data.train_dataloader,
        val_dataloader=data.val_dataloader,
        logger=log,
        run_timer=RunTimer(cfg.exp_manager.get("max_time_per_run")),
        **loop_kwargs,
    )
    export = (lambda path: nemo_fn(model, path)) if nemo_fn is not None else model.save_to
    loop.ckpt_callback = CheckpointCallback(
        experiment, cfg.exp_manager.get("checkpoint_callback_params"), loop.checkpoint_state, export
    )
    if before_resume is not None:
        before_resume(loop)
    if experiment.resume_path is not None:
        loop.resume_from(experiment.resume_path)
    log.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return loop


def validate_dpo_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int) -> None:
    """Every DPO config problem at once, before anything expensive."""
    from nemo_aligner.losses.preference import PREFERENCE_LOSSES
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import REFERENCE_STRATEGIES

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
    clamp_lengths_to_context(cfg, ("model.data.seq_length",), int(model_cfg.encoder_seq_length))
    with open_dict(model_cfg):
        model_cfg.data.seq_length = min(int(model_cfg.data.seq_length), int(model_cfg.encoder_seq_length))


def build_dpo_data(cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None) -> TrainingData:
    """Tokenizer, train/validation preference datasets (validated in full) and their dataloaders."""
    from megatron.core import parallel_state

    from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataloader, build_dpo_datasets
    from nemo_aligner.utils.utils import build_tokenizer_for

    set_model_parallel_from_config(model_cfg)
    tokenizer = build_tokenizer_for(model_cfg, restore_path)
    gbs = int(model_cfg.global_batch_size)
    datasets = build_dpo_datasets(
        model_cfg.data,
        None,
        tokenizer,
        dpo_cfg=model_cfg.get("dpo"),
        splits=("train", "validation"),
        global_batch_size=gbs,
    )
    common = {
        "data_parallel_rank": parallel_state.get_data_parallel_rank(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }
    seed = int(model_cfg.get("seed", 1234))
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dpo_dataloader(
            model_cfg.data, datasets["train"], tokenizer, gbs, train=True, seed=seed, **common
        ),
        val_dataloader=build_dpo_dataloader(
            model_cfg.data, datasets["validation"], tokenizer, gbs, train=False, **common
        ),
    )


def uses_lora(model_cfg: DictConfig) -> bool:
    return (model_cfg.get("peft") or {}).get("peft_scheme", "none") == "lora"


def export_lora_run(model, path: Path) -> None:
    """A LoRA run's export: the adapters alone (``<name>.lora/``), small and loadable onto the base model."""
    from nemo_aligner.models.nlp.gpt.lora import save_lora_adapters

    save_lora_adapters(model, Path(path).with_suffix(".lora"))


def merge_lora_and_save(model, path: Path) -> None:
    """Fold the adapters into the base weights and write a full ``.nemo`` that loads as a plain GPT."""
    from nemo_aligner.models.nlp.gpt.lora import merge_lora_adapters

    merge_lora_adapters(model)
    model.save_to(path)


def configure_peft(model, model_cfg: DictConfig) -> None:
    """Apply ``model.peft`` (LoRA) to a freshly built model, before its optimizer exists."""
    peft = model_cfg.get("peft") or {}
    if peft.get("peft_scheme", "none") in (None, "none"):
        return
    from nemo_aligner.models.nlp.gpt.lora import apply_lora

    apply_lora(model, peft)


def validate_spin_config(cfg: DictConfig, model_cfg: DictConfig, world_size: int, loop: str = "spin") -> None:
    """Every SPIN (and Self-Rewarding) config problem at once, before anything expensive."""
    from nemo_aligner.generation import LengthParams, SamplingParams
    from nemo_aligner.losses.preference import PREFERENCE_LOSSES
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import REFERENCE_STRATEGIES

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
    clamp_lengths_to_context(cfg, keys, context)
    clamp_lengths_to_context(model_cfg, ("spin.length_params.max_length",), context)


def build_spin_data(cfg: DictConfig, model_cfg: DictConfig, restore_path: str | None, max_steps: int) -> TrainingData:
    """Prompts + ground truth (SFT data) for the rollouts, a pairs dataloader, and the SFT validation loader."""
    from megatron.core import parallel_state

    from nemo_aligner.algorithms.spin import SPINBatchSampler, SPINPairsDataset, spin_custom_collate
    from nemo_aligner.data.nlp.builders import (
        build_collate,
        build_dataloader,
        build_sft_dataset,
        build_validation_sampler,
        num_samples_for,
    )
    from nemo_aligner.data.nlp.collate import resolve_pad_id
    from nemo_aligner.data.nlp.jsonl import check_global_batch_fits
    from nemo_aligner.utils.utils import build_tokenizer_for

    set_model_parallel_from_config(model_cfg)
    tokenizer = build_tokenizer_for(model_cfg, restore_path)
    data_cfg = cfg.model.data
    train_cfg, val_cfg = data_cfg.train_ds, data_cfg.validation_ds
    gbs, seed = int(model_cfg.global_batch_size), int(model_cfg.get("seed", 1234))
    sft_train = build_sft_dataset(data_cfg, train_cfg, tokenizer, seed, num_samples_for(data_cfg, max_steps, gbs))
    val_ds = build_sft_dataset(data_cfg, val_cfg, tokenizer, seed)
    check_global_batch_fits(train_cfg.file_path, len(sft_train), gbs)
    dp = {
        "data_parallel_rank": parallel_state.get_data_parallel_rank(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }
    pairs = SPINPairsDataset(sft_train, resolve_pad_id(tokenizer))
    train_sampler = SPINBatchSampler(
        len(pairs),
        gbs,
        consumed_samples=0,
        seed=seed,
        shuffle=bool(train_cfg.get("shuffle", True)),
        drop_last=bool(train_cfg.get("drop_last", True)),
        **dp,
    )
    collate = spin_custom_collate(resolve_pad_id(tokenizer), None, int(model_cfg.encoder_seq_length))
    return TrainingData(
        tokenizer=tokenizer,
        train_dataloader=build_dataloader(pairs, train_sampler, collate, {"num_workers": 0}),
        val_dataloader=build_dataloader(
            val_ds, build_validation_sampler(val_cfg, val_ds, gbs, **dp), build_collate(val_cfg, tokenizer), data_cfg
        ),
        sft_train_dataset=sft_train,
    )


def planned_iteration_steps(loop_cfg: DictConfig, steps_per_epoch: int) -> int:
    """Total optimizer steps of an iterated run (SPIN, Self-Rewarding): one LR schedule spans all iterations."""
    from nemo_aligner.algorithms.base import limited

    per_epoch = max(limited(steps_per_epoch, loop_cfg.get("limit_train_batches", 1.0)), 1)
    total = int(loop_cfg.get("max_iterations", 1)) * int(loop_cfg.get("max_epochs", 1)) * per_epoch
    max_steps = int(loop_cfg.get("max_steps", -1) or -1)
    return total if max_steps < 0 else min(max_steps, total)
