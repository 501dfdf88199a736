"""What every run shares, in the order a run happens: launch, model config, checks, data set-up, model, loop,
optimizer, checkpoints, resume.

Lightning's role is the launcher and environment: ``trainer.devices``/``num_nodes``, Slurm detection, the
process launch for ``devices=N`` on one node, loggers and the precision flag. It never wraps the model in its
own DDP and never runs a loop: megatron-core's DDP/optimizer and our trainers in ``nemo_aligner.algorithms`` do.

The number of optimizer steps is the loop's (``BaseTrainer.max_steps``, from the data): the loop is built before
the optimizer, whose LR schedule spans that number.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_aligner.models.nlp.gpt.lora import load_lora_adapters, merge_lora_adapters, save_lora_adapters
from nemo_aligner.utils.config import freeze_long_lived_objects, model_seed, register_resolvers
from nemo_aligner.utils.config_keys import apply_aliases, warn_no_effect
from nemo_aligner.utils.config_validation import (
    ConfigChecker,
    check_checkpoint_architecture,
    check_finite_numbers,
    check_loop,
    check_model_parallel,
    check_optimizer,
    check_resume_checkpoint,
)
from nemo_aligner.utils.distributed import RankInfo, set_model_parallel_from_config, start_process_group
from nemo_aligner.utils.exp_manager import CheckpointCallback, CustomLoggerWrapper, Experiment, RunTimer, exp_manager
from nemo_aligner.utils.utils import build_tokenizer_for, load_checkpoint_model_config, merge_over_checkpoint_config

logger = logging.getLogger(__name__)

# Keys of cfg.trainer that Lightning's Trainer receives; the rest (sft/dpo/spin/... loop settings) are ours.
LIGHTNING_TRAINER_KEYS = ("accelerator", "devices", "num_nodes", "precision", "strategy")


# ---------------------------------------------------------------------------------------------- launch
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
    apply_aliases(cfg, pop_trainer_key)  # NeMo-Aligner's other spellings (trainer.max_steps, ...)
    warn_no_effect(cfg)
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
    # The run config, for NeMo-Aligner's train_script_utils entries that receive only the trainer.
    trainer.aligner_run_cfg, trainer.aligner_loop_key = cfg, pop_trainer_key
    _launch_and_initialize(trainer)
    return trainer


def _launch_and_initialize(trainer: Trainer) -> None:
    """Start sibling processes if Lightning must (devices=N, no external launcher), then torch.distributed.

    megatron-core's parallel groups come later, from the checked model config (:func:`data_parallel_layout`)."""
    strategy = trainer.strategy
    launcher = getattr(strategy, "launcher", None)
    environment = getattr(strategy, "cluster_environment", None)
    if launcher is not None and environment is not None and not environment.creates_processes_externally:
        launcher.launch(lambda: None)
    if environment is None:
        start_process_group()
        return
    strategy.set_world_ranks()
    start_process_group(
        rank_info=RankInfo(
            rank=environment.global_rank(),
            world_size=environment.world_size(),
            local_rank=environment.local_rank(),
            master_addr=environment.main_address,
            master_port=environment.main_port,
            source=type(environment).__name__,
        )
    )


# ---------------------------------------------------------------------------------------------- model config
def override_model_config_from_checkpoint(cfg: DictConfig, checkpoint_cfg: DictConfig) -> DictConfig:
    """``cfg.model`` over the checkpoint's model config; ``encoder_seq_length`` always from the checkpoint."""
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
    if not Path(restore_path).exists():
        raise FileNotFoundError(f"model checkpoint not found: {restore_path}")
    return override_model_config_from_checkpoint(cfg, load_checkpoint_model_config(restore_path))


# ---------------------------------------------------------------------------------------------- checks
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
    check_evaluation(checker, loop)
    data_parallel_size = check_model_parallel(checker, "model", world_size)
    check_optimizer(checker, "model.optim")
    restore = checker.get("model.restore_from_path") or checker.get("pretrained_checkpoint.restore_from_path")
    if restore and not Path(restore).exists():
        checker.add("restore_from_path", f"checkpoint not found: {restore}")
    elif restore:
        check_checkpoint_architecture(checker, "model", restore)
    check_resume_checkpoint(checker, loop)
    if loop in ("dpo", "sft"):
        checker.choice("model.peft.peft_scheme", ("none", "lora"), required=False)
    elif (checker.get("model.peft.peft_scheme") or "none") != "none":
        checker.add(
            "model.peft.peft_scheme", f"LoRA is supported by SFT and DPO, not by trainer.{loop}: set it to none"
        )
    max_time = checker.get("exp_manager.max_time_per_run")
    if max_time is not None:
        try:
            RunTimer(max_time)
        except ValueError as err:
            checker.add("exp_manager.max_time_per_run", str(err))
    return data_parallel_size


# ---------------------------------------------------------------------------------------------- a run
@dataclass
class Run:
    """A started run: launched processes, the effective model config (checked), the experiment and its logger."""

    cfg: DictConfig
    loop_key: str
    trainer: Trainer
    restore_path: str | None
    model_cfg: DictConfig
    experiment: Experiment
    log: CustomLoggerWrapper
    started: float = field(default_factory=time.monotonic)  # for the summary's wall time

    @property
    def loop_cfg(self) -> DictConfig:
        return self.cfg.trainer[self.loop_key]


def start_run(
    cfg: DictConfig, loop_key: str, restore_path: str | None, validate: Callable[[DictConfig, DictConfig, int], None]
) -> Run:
    """Launch (processes, process group), the model config (``cfg.model`` over the checkpoint's), every config
    check at once (``validate(cfg, model_cfg, world_size)``), then the experiment directory and loggers."""
    trainer = resolve_and_create_trainer(cfg, loop_key)
    model_cfg = model_config_for_training(cfg, restore_path)
    validate(cfg, model_cfg, trainer.world_size)
    return start_experiment(cfg, loop_key, trainer, restore_path, model_cfg)


def start_experiment(
    cfg: DictConfig, loop_key: str, trainer: Trainer, restore_path: str | None, model_cfg: DictConfig
) -> Run:
    """The experiment directory (resume point, checkpoints) and the loggers of a launched, checked run."""
    experiment = exp_manager(trainer, cfg.exp_manager)
    from nemo_aligner.recipes.summary import keep_console_log

    keep_console_log(experiment.log_dir)
    return Run(cfg, loop_key, trainer, restore_path, model_cfg, experiment, CustomLoggerWrapper(trainer.loggers))


@dataclass
class TrainingData:
    tokenizer: Any
    train_dataloader: Any
    val_dataloader: Any
    sft_train_dataset: Any = None


def data_parallel_layout(model_cfg: DictConfig, restore_path: str | None) -> tuple[Any, dict[str, int]]:
    """What every data builder starts with: the model-parallel groups (data shards follow them), the tokenizer
    (built before the model), and this rank's ``data_parallel_rank``/``data_parallel_size``."""
    set_model_parallel_from_config(model_cfg)
    tokenizer = build_tokenizer_for(model_cfg, restore_path)
    layout = {
        "data_parallel_rank": parallel_state.get_data_parallel_rank(),
        "data_parallel_size": parallel_state.get_data_parallel_world_size(),
    }
    return tokenizer, layout


def build_model(model_cls, model_cfg: DictConfig, restore_path: str | None, trainer: Trainer, tokenizer):
    """Restore ``model_cls`` from ``restore_path`` with ``model_cfg``, or build it from scratch."""
    if restore_path:
        from nemo_aligner.utils.utils import load_from_nemo

        return load_from_nemo(model_cls, model_cfg, trainer, restore_path=restore_path, tokenizer=tokenizer)
    return model_cls(model_cfg, trainer, tokenizer=tokenizer)


def assemble(
    run: Run,
    trainer_cls,
    model_cls,
    data: TrainingData,
    configure_model: Callable[[Any], None] | None = None,
    before_resume: Callable[[Any], None] | None = None,
    nemo_fn: Callable[[Any, Path], None] | None = None,
    **loop_kwargs: Any,
):
    """The model, the loop (which knows the number of steps), the optimizer and LR schedule over those steps, the
    checkpoint callback; resume if asked.

    ``configure_model(model)`` runs before the optimizer is built (e.g. loading LoRA adapters, the reference
    policy's first snapshot); ``before_resume(loop)`` runs before a trainer checkpoint is loaded (e.g. scoring the
    precomputed reference with the initial weights). ``nemo_fn(model, path)`` exports the model (default:
    ``model.save_to(path)``).
    """
    model = build_model(model_cls, run.model_cfg, run.restore_path, run.trainer, data.tokenizer)
    if configure_model is not None:
        configure_model(model)
    loop = trainer_cls(
        cfg=run.loop_cfg,
        model=model,
        train_dataloader=data.train_dataloader,
        val_dataloader=data.val_dataloader,
        logger=run.log,
        run_timer=RunTimer(run.cfg.exp_manager.get("max_time_per_run")),
        **loop_kwargs,
    )
    clip = run.loop_cfg.get("gradient_clip_val", 0.0)
    loop.optimizer, loop.scheduler = model.setup_optimization(run.model_cfg.optim, loop.max_steps, clip)
    export = (lambda path: nemo_fn(model, path)) if nemo_fn is not None else model.save_to
    loop.ckpt_callback = CheckpointCallback(
        run.experiment, run.cfg.exp_manager.get("checkpoint_callback_params"), loop.checkpoint_state, export
    )
    attach_evaluation(run, loop, data)
    if before_resume is not None:
        before_resume(loop)
    if run.experiment.resume_path is not None:
        loop.resume_from(run.experiment.resume_path)
    run.log.log_hyperparams(OmegaConf.to_container(run.cfg, resolve=True))
    return loop


def check_evaluation(checker: ConfigChecker, loop: str) -> None:
    """``trainer.<loop>.evaluation`` (held-out generation evaluation), when enabled."""
    prefix = f"trainer.{loop}.evaluation"
    if not checker.boolean(f"{prefix}.enabled"):
        return
    from nemo_aligner.evaluation import METRICS, evaluation_sampling_params, load_normalizer
    from nemo_aligner.generation import SamplingParams

    checker.integer(f"{prefix}.num_prompts", minimum=1)
    checker.integer(f"{prefix}.max_length", minimum=1)
    checker.integer(f"{prefix}.batch_size", minimum=1, required=False)
    checker.choice(f"{prefix}.metric", METRICS, required=False)
    try:
        load_normalizer(checker.get(f"{prefix}.normalizer"))
    except ValueError as err:
        checker.add(f"{prefix}.normalizer", str(err))
    sampling = checker.get(f"{prefix}.sampling")
    try:
        plain = OmegaConf.to_container(sampling, resolve=True) if isinstance(sampling, DictConfig) else sampling
        SamplingParams.from_config(evaluation_sampling_params(plain))
    except (ValueError, TypeError) as err:
        checker.add(f"{prefix}.sampling", str(err))


def attach_evaluation(run: Run, loop, data: TrainingData) -> None:
    """The held-out generation evaluation (``trainer.<algorithm>.evaluation``) on the validation set's prompts (a
    preference set's chosen responses are its answers), reported in ``<log dir>/evaluation.json``."""
    node = run.loop_cfg.get("evaluation")
    if not node or not node.get("enabled", False):
        return
    from nemo_aligner.evaluation import REPORT_FILE, EvaluationReport, PreferencePrompts, build_evaluator

    prompts = data.val_dataloader.dataset
    if not hasattr(prompts, "prompt_and_answer"):
        prompts = PreferencePrompts(prompts)
    loop.evaluator = build_evaluator(node, prompts, data.tokenizer, model_seed(run.model_cfg))
    loop.evaluation_report = EvaluationReport(Path(run.experiment.log_dir) / REPORT_FILE, loop.evaluator.num_prompts)


def train(run: Run, loop, after_fit: Callable[[], None] | None = None) -> None:
    """Train, ``after_fit()`` (e.g. a LoRA run's merged export), then the end of a run: plots of the logged metrics
    and the summary (``recipes/summary.py``)."""
    from nemo_aligner.recipes.summary import finish_run, start_console_log

    start_console_log()
    freeze_long_lived_objects()  # the model, the data and the tokenizer live until the run ends
    loop.fit()
    if after_fit is not None:
        after_fit()
    nemo_path = loop.ckpt_callback.final_nemo_path if loop.ckpt_callback is not None else None
    finish_run(run.experiment.name, loop, Path(run.experiment.log_dir), nemo_path, run.started)


# ---------------------------------------------------------------------------------------------- LoRA runs (SFT, DPO)
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


def merge_lora_when_done(loop) -> Callable[[], None]:
    """A LoRA run's ``after_fit``: once the run reached its last step (the adapters were exported beside the
    checkpoints), the final ``.nemo`` is the merged, full model."""

    def merge() -> None:
        if loop.step >= loop.max_steps:
            merge_lora_and_save(loop.model, loop.ckpt_callback.final_nemo_path)

    return merge


def merge_lora_and_save(model, path: Path) -> None:
    """Fold the adapters into the base weights and write a full ``.nemo`` that loads as a plain GPT."""
    merge_lora_adapters(model)
    model.save_to(path)
