"""Experiment manager: log directory, loggers, checkpoint saving/retention and resume.

Keys (``exp_manager.*``, as in NeMo): ``explicit_log_dir`` (or ``exp_dir``/``name``), ``create_tensorboard_logger``
and ``create_csv_logger`` (default on), ``create_wandb_logger`` with ``wandb_logger_kwargs.{project,name,offline}``,
``resume_if_exists``, ``resume_ignore_no_checkpoint``, ``resume_from_checkpoint``, ``max_time_per_run`` ("DD:HH:MM:SS"),
``checkpoint_callback_params.{monitor, save_top_k, mode, always_save_nemo, save_nemo_on_train_end, filename}``.

A resumed run's ``metrics.csv`` holds exactly the rows an uninterrupted run would have: each checkpoint flushes the
CSV logger and records its row count, and resuming cuts the file back to that count (rows logged after the
checkpoint, by a run that was then killed, are logged again by the resumed run).
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig, OmegaConf

from nemo_aligner.checkpoint import run_identity, trainer_checkpoint
from nemo_aligner.utils import run_lock
from nemo_aligner.utils.distributed import is_global_rank_zero
from nemo_aligner.utils.health import require_finite
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import RunTimer  # noqa: F401 (this module's name for it since ever)

logger = logging.getLogger(__name__)

# Trainer-state key: rows of metrics.csv when the checkpoint was saved (a resume cuts the file back to it).
METRICS_ROWS_KEY = "metrics_csv_rows"


@dataclass
class Experiment:
    """Where a run writes, and the checkpoint it resumes from (``None`` for a fresh start)."""

    log_dir: Path
    checkpoint_dir: Path
    resume_path: Path | None
    name: str = "megatron_gpt"
    csv_logger: ResumableCSVLogger | None = None
    identity: dict[str, Any] | None = None  # what a step means (run_identity), stored in every checkpoint


def resolve_log_dir(cfg: Mapping[str, Any]) -> Path:
    if cfg.get("explicit_log_dir"):
        return Path(cfg["explicit_log_dir"])
    return Path(cfg.get("exp_dir") or "results") / (cfg.get("name") or "default")


def exp_manager(trainer, cfg: DictConfig | Mapping[str, Any] | None) -> Experiment:
    """Create the log directory and loggers (set on ``trainer.loggers``) and find the checkpoint to resume from."""
    cfg = OmegaConf.create(cfg or {})
    log_dir = resolve_log_dir(cfg)
    take_run_lock(log_dir)
    checkpoint_dir = log_dir / "checkpoints"
    if is_global_rank_zero():
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    trainer.loggers = build_loggers(cfg, log_dir)
    csv_logger = next((one for one in trainer.loggers if isinstance(one, ResumableCSVLogger)), None)
    trainer_checkpoint.remove_partial_checkpoints(checkpoint_dir)
    resume_path = None
    if cfg.get("resume_if_exists", True):
        existing = trainer_checkpoint.list_checkpoints(checkpoint_dir)
        if existing:
            resume_path = existing[-1]
            logger.info("Resuming from %s", resume_path)
        elif not cfg.get("resume_ignore_no_checkpoint", True) and not cfg.get("resume_from_checkpoint"):
            raise FileNotFoundError(
                f"exp_manager.resume_if_exists=True and resume_ignore_no_checkpoint=False, but {checkpoint_dir} "
                "holds no complete checkpoint"
            )
    if resume_path is None and cfg.get("resume_from_checkpoint"):
        # NeMo's key: a checkpoint (of another run, say) to start from; once this run has saved its own, those
        # continue it (a resubmitted job does not go back to the starting point).
        resume_path = Path(cfg.resume_from_checkpoint)
        logger.info("Resuming from %s (exp_manager.resume_from_checkpoint)", resume_path)
    if csv_logger is not None and is_global_rank_zero():
        rows = trainer_checkpoint.read_trainer_state(resume_path).get(METRICS_ROWS_KEY) if resume_path else 0
        csv_logger.truncate(rows)
    name = cfg.get("name") or "megatron_gpt"
    experiment = Experiment(log_dir, checkpoint_dir, resume_path, name, csv_logger, run_identity.take())
    # NeMo-Aligner's scripts ignore the return value and read the resume point from the trainer
    # (``trainer.ckpt_path``); the train_script_utils entries find the experiment there too.
    trainer.aligner_experiment = experiment
    if resume_path is not None:
        trainer.ckpt_path = str(resume_path)
    return experiment


def take_run_lock(log_dir: Path) -> None:
    """One run per results directory: rank 0 takes ``run.lock`` and every rank learns whether it may go on."""
    import torch.distributed as dist

    failure = None
    if is_global_rank_zero():
        try:
            run_lock.acquire(log_dir)
        except run_lock.RunLockedError as err:
            failure = str(err)
    if dist.is_initialized() and dist.get_world_size() > 1:
        holder = [failure]
        dist.broadcast_object_list(holder, src=0)
        failure = holder[0]
    if failure is not None:
        raise run_lock.RunLockedError(failure)


def build_loggers(cfg: DictConfig, log_dir: Path) -> list:
    """TensorBoard and CSV loggers (unless switched off), plus W&B on request (offline works without network)."""
    loggers = []
    if cfg.get("create_tensorboard_logger", True):
        loggers.append(TensorBoardLogger(save_dir=str(log_dir), name="", version="tensorboard"))
    if cfg.get("create_csv_logger", True):
        loggers.append(ResumableCSVLogger(save_dir=str(log_dir), name="", version="csv"))
    if cfg.get("create_wandb_logger", False):
        loggers.append(_wandb_logger(cfg, log_dir))
    return loggers


class _AppendingCSVWriter(ExperimentWriter):
    """Keeps an existing ``metrics.csv`` (and its columns) instead of deleting it, as Lightning's writer does."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSV logger, except that a resumed run appends to ``metrics.csv`` (cut back to its checkpoint)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(log_dir=self.log_dir)
        return self._experiment

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE

    def flush(self) -> int:
        """Write the buffered rows; returns the number of rows in ``metrics.csv``."""
        self.experiment.save()
        if not self.metrics_file.is_file():
            return 0
        with self.metrics_file.open(newline="") as file:
            return sum(1 for _ in csv.DictReader(file))

    def truncate(self, rows: int | None) -> None:
        """Keep the first ``rows`` rows of ``metrics.csv`` (all of them when ``rows`` is None: an older checkpoint;
        none, and no file, when 0: a fresh start)."""
        if rows is None or not self.metrics_file.is_file():
            return
        if rows == 0:
            self.metrics_file.unlink()
            return
        with self.metrics_file.open(newline="") as file:
            reader = csv.DictReader(file)
            fields, kept = reader.fieldnames or [], list(reader)[:rows]
        tmp = self.metrics_file.with_suffix(".tmp")
        with tmp.open("w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(self.metrics_file)


def _wandb_logger(cfg: DictConfig, log_dir: Path):
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError as err:
        raise ImportError(
            "exp_manager.create_wandb_logger=True needs wandb: pip install 'nemo_aligner[wandb]' "
            "(set WANDB_MODE=offline or exp_manager.wandb_logger_kwargs.offline=true without network)"
        ) from err
    kwargs = OmegaConf.to_container(cfg.get("wandb_logger_kwargs") or {}, resolve=True)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return WandbLogger(save_dir=str(log_dir), **kwargs)


class CustomLoggerWrapper:
    """Logs to every configured logger from global rank 0 (NeMo-Aligner's name and interface)."""

    def __init__(self, loggers: list):
        self.loggers = list(loggers or [])

    def log_metrics(self, metrics: Mapping[str, float], step: int, prefix: str = "") -> None:
        if not is_global_rank_zero():
            return
        named = {f"{prefix}{k}": float(v) for k, v in metrics.items()}
        for one in self.loggers:
            one.log_metrics(named, step=step)

    def log_hyperparams(self, params: Mapping[str, Any]) -> None:
        if not is_global_rank_zero():
            return
        for one in self.loggers:
            one.log_hyperparams(dict(params))

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table of texts (e.g. prompt / response samples): a W&B table, TensorBoard text and a JSONL file."""
        if not is_global_rank_zero():
            return
        for one in self.loggers:
            if type(one).__name__ == "WandbLogger":
                one.log_table(key=key, columns=columns, data=rows, step=step)
            elif type(one).__name__ == "TensorBoardLogger":
                header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
                body = "".join("| " + " | ".join(_md_cell(c) for c in row) + " |\n" for row in rows)
                one.experiment.add_text(key, header + body, global_step=step)

    def finalize(self) -> None:
        if not is_global_rank_zero():
            return
        for one in self.loggers:
            one.finalize("success")
            if type(one).__name__ == "WandbLogger":
                # Lightning leaves the run open; an in-process caller (a notebook, a sweep) would otherwise lose the
                # last history rows, which wandb writes only when the run finishes.
                one.experiment.finish()


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "\\n")


_FIELD = re.compile(r"\{([A-Za-z0-9_/]+)(:[^}]*)?\}")


def format_checkpoint_name(template: str, values: Mapping[str, Any]) -> str:
    """Lightning-style names: ``"{val_loss:.3f}-{step}"`` -> ``"val_loss=0.123-step=10"``; unknown values: ``=na``."""

    def render(match: re.Match) -> str:
        key, fmt = match.group(1), (match.group(2) or ":")[1:]
        if key not in values or values[key] is None:
            return f"{key}=na"
        return f"{key.replace('/', '_')}={format(values[key], fmt)}"

    return _FIELD.sub(render, template).replace("/", "_")


class CheckpointCallback:
    """Saves trainer checkpoints, keeps the best ``save_top_k`` by ``monitor`` plus the latest, exports ``.nemo``.

    ``state_fn()`` returns (sharded state dict, trainer state); ``nemo_fn(path)`` writes the model as ``.nemo``.
    """

    def __init__(
        self,
        experiment: Experiment,
        params: Mapping[str, Any] | None,
        state_fn: Callable[[], tuple[dict, dict]],
        nemo_fn: Callable[[Path], None],
    ):
        params = dict(params or {})
        self.checkpoint_dir = experiment.checkpoint_dir
        self.monitor = params.get("monitor", "val_loss")
        self.mode = params.get("mode", "min")
        if self.mode not in ("min", "max"):
            raise ValueError(f"exp_manager.checkpoint_callback_params.mode must be 'min' or 'max', got {self.mode!r}")
        self.save_top_k = int(params.get("save_top_k", 3))
        self.always_save_nemo = bool(params.get("always_save_nemo", False))
        self.save_nemo_on_train_end = bool(params.get("save_nemo_on_train_end", True))
        self.filename = params.get("filename") or "{step}-{consumed_samples}"
        self.state_fn = state_fn
        self.nemo_fn = nemo_fn
        self.final_nemo_path = experiment.checkpoint_dir / f"{experiment.name}.nemo"
        self.csv_logger = experiment.csv_logger
        self.identity = experiment.identity

    def custom_save(self, monitor_candidates: Mapping[str, Any], is_train_end: bool = False) -> Path:
        """Save a checkpoint named from ``monitor_candidates`` (which also holds ``step`` etc.).

        At the end of training the final ``.nemo`` is exported first: a run killed during the export then resumes
        from an earlier checkpoint and exports again, instead of finding its last checkpoint done and no ``.nemo``.
        """
        sharded, trainer_state = self.state_fn()
        # Nothing non-finite is ever written: the last checkpoint on disk stays the last good one.
        require_finite(sharded, "a checkpoint or .nemo", int(monitor_candidates.get("step", 0)))
        if is_train_end and self.save_nemo_on_train_end:
            self.nemo_fn(self.final_nemo_path)
        trainer_state = {**trainer_state, "monitor": {self.monitor: monitor_candidates.get(self.monitor)}}
        if self.identity is not None:  # what a step means: checked when a run resumes from this one
            trainer_state[run_identity.TRAINER_STATE_KEY] = self.identity
        if self.csv_logger is not None and is_global_rank_zero():
            trainer_state[METRICS_ROWS_KEY] = self.csv_logger.flush()
        name = format_checkpoint_name(self.filename, monitor_candidates)
        export = (lambda d: self.nemo_fn(d / "model.nemo")) if self.always_save_nemo else None
        path = trainer_checkpoint.save_checkpoint(self.checkpoint_dir, name, sharded, trainer_state, export)
        kill_point("before_prune")
        self._prune(keep=path)
        return path

    def _prune(self, keep: Path) -> None:
        if not is_global_rank_zero() or self.save_top_k < 0:
            return
        checkpoints = trainer_checkpoint.list_checkpoints(self.checkpoint_dir)

        def score(path: Path) -> float:
            value = trainer_checkpoint.read_trainer_state(path).get("monitor", {}).get(self.monitor)
            if value is None:
                return float("inf")
            return value if self.mode == "min" else -value

        best = sorted(checkpoints, key=score)[: self.save_top_k]
        for path in checkpoints:
            if path not in best and path != keep:
                shutil.rmtree(path, ignore_errors=True)


class PreemptionHandler:
    """Turns SIGTERM (Slurm preemption, ``scancel``) and SIGINT (Ctrl-C) into a flag the loop checks after each
    step: the run saves a checkpoint at the step boundary and stops. A second Ctrl-C stops at once, unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        try:
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
        logger.warning("%s received: saving a checkpoint and stopping after this step (Ctrl-C again: stop now)", name)
        self.received = True

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False
