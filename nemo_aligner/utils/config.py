"""Hydra/OmegaConf plumbing for the entry scripts.

* OmegaConf resolvers used in NeMo-Aligner configs: ``multiply``, ``int_div``, ``subtract`` and ``divide``,
  plus ``embedded_data`` (the path of a bundled data file).
* :func:`hydra_runner`: the entry-point decorator. ``main()`` parses the command line with Hydra;
  ``main(cfg)`` runs in-process with a config object (tests and custom pipelines do that).
* :func:`compose_config`: a script's config with command-line style overrides, without running it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_aligner.utils.run_lock import released_on_exit
from nemo_aligner.utils.seeds import NEMO_DEFAULT_SEED, model_seed  # noqa: F401 (the seeds' home is seeds.py)
from nemo_aligner.utils.timers import mark_event

EMBEDDED_DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "embedded"

RESOLVERS: dict[str, Callable] = {
    "multiply": lambda x, y: x * y,
    "int_div": lambda x, y: x // y,
    "subtract": lambda x, y: x - y,
    "divide": lambda x, y: x / y,
    # ${embedded_data:sft_train.jsonl}: a file of the bundled synthetic data set (the embedded default).
    "embedded_data": lambda name: str(EMBEDDED_DATA_DIR / name),
}

# Hydra writes no output directory or log files and keeps the working directory: our exp_manager owns outputs.
HYDRA_DEFAULT_OVERRIDES = (
    "hydra.output_subdir=null",
    "hydra.run.dir=.",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


class ProgressBarSafeHandler(logging.StreamHandler):
    """A stderr handler that writes through ``tqdm.write``: a log line printed while the training progress bar is
    drawn lands on its own line, and the bar is redrawn below it."""

    def emit(self, record) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 (logging must never raise; the standard handler's convention)
            self.handleError(record)


WARNINGS_LOGGER = "py.warnings"
"""Where :func:`logging.captureWarnings` sends Python warnings: the entry scripts print them as log lines."""


def configure_logging() -> None:
    """``nemo_aligner`` messages at INFO on global rank 0 (WARNING elsewhere), on stderr, once per process. Python
    warnings become log lines through the same handler, so a warning raised while the progress bar is drawn does
    not land on the bar's line (where the bar's redraw would hide it)."""
    import os

    package_logger = logging.getLogger("nemo_aligner")
    if package_logger.handlers:
        return
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    handler = ProgressBarSafeHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s %(levelname)s %(name)s] %(message)s", "%H:%M:%S"))
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logging.captureWarnings(True)
    logging.getLogger(WARNINGS_LOGGER).addHandler(handler)


_process_ends_with_run = False
"""True in an entry script's process (``main()`` from the command line): it ends when the run does."""


def freeze_long_lived_objects() -> None:
    """Take every object alive now out of the cyclic garbage collector's walks (``gc.freeze``), in a process that
    ends with its run. The imports alone leave ~500k objects, the loaded data more; each full collection walked
    them all (~50 ms each, several per run, and ~1 s of collections at the interpreter's exit). Frozen objects
    are still freed when their last reference goes; only a cycle among them would stay until the process ends, so
    a run called in-process (``main(cfg)``, tests, users' pipelines) freezes nothing, and neither does a job of a
    Hydra multirun (``-m``: the next job runs in the same process) after the imports."""
    if _process_ends_with_run and not _in_multirun_job():
        gc.freeze()


@contextlib.contextmanager
def _collector_of_a_command() -> Iterator[None]:
    """The garbage collector of a command's process (``main()`` from the command line), which ends with the run:
    the imports frozen (the entry scripts pause the collector while they import), the run's long-lived objects
    frozen by the recipes before their loop, and at the end one collection while everything is alive (finalizers
    that flush files still see their objects) and a freeze at exit, so the interpreter's teardown walks nothing
    (~0.8 s with torch, megatron-core and Lightning loaded). A caller that goes on in the same process (a test
    harness running the script in-process) gets its usual collector back."""
    global _process_ends_with_run
    _process_ends_with_run = True
    freeze_long_lived_objects()
    gc.enable()
    try:
        yield
    finally:
        _process_ends_with_run = False
        gc.collect()  # cheap: what the imports and the recipe froze is not walked
        gc.unfreeze()
        atexit.register(gc.freeze)


def _in_multirun_job() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def hydra_runner(config_path: str, config_name: str):
    """Decorate ``main(cfg)``: Hydra parses ``sys.argv`` when called without a config."""

    def decorator(task: Callable[[DictConfig], None]):
        @functools.wraps(task)
        def wrapper(cfg: DictConfig | None = None):
            mark_event("imports_done")
            register_resolvers()
            configure_logging()
            if cfg is not None:
                with released_on_exit():  # the results-directory lock of this run, also when it raises
                    return task(cfg)
            import hydra

            caller_dir = Path(sys.modules[task.__module__].__file__).resolve().parent
            absolute = str((caller_dir / config_path).resolve())
            from nemo_aligner.utils.user_errors import exit_on_user_error

            # A +key/++key no code reads is reported before the run starts (compose_config checks them).
            name, overrides = _config_name_and_overrides(sys.argv[1:], config_name)
            if any(o.startswith("+") for o in overrides):
                exit_on_user_error(compose_config)(absolute, name, overrides)
            sys.argv = [*sys.argv, *HYDRA_DEFAULT_OVERRIDES]

            # A user error (bad key, data, checkpoint) ends the command with its message, not a traceback.
            with _collector_of_a_command():
                result = hydra.main(config_path=absolute, config_name=config_name, version_base=None)(
                    exit_on_user_error(released_on_exit()(task))
                )()
                mark_event("run_done")  # what follows is the interpreter's exit
            return result

        return wrapper

    return decorator


def compose_config(config_dir: str | Path, config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config a script would run with, given command-line overrides (Hydra syntax, ``++key=value`` too)."""
    from hydra import compose, initialize_config_dir

    from nemo_aligner.utils.config_keys import check_added_keys

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base=None):
        cfg = compose(config_name=config_name, overrides=list(overrides))
        added = [o for o in overrides if o.startswith("+")]
        if added:  # reported when no code reads them (a typo would otherwise pass quietly)
            check_added_keys(compose(config_name=config_name, overrides=_without(overrides, added)), added)
        return cfg


def _without(overrides: Sequence[str], added: Sequence[str]) -> list[str]:
    """The overrides that set keys the config file has (those of the added keys' subtrees left out too). Deletions
    (``~key``) are left out as well: a key deleted then added again (``~model.optim.sched
    +model.optim.sched.name=Constant``, NeMo's way to replace a section) is a key of the file."""
    from nemo_aligner.utils.config_keys import added_keys

    new_keys = added_keys(added)
    return [
        o
        for o in overrides
        if o not in added
        and not o.startswith("~")
        and not any(o.split("=", 1)[0].startswith(k + ".") for k in new_keys)
    ]


def _config_name_and_overrides(argv: Sequence[str], default_name: str) -> tuple[str, list[str]]:
    """The ``--config-name``/``-cn`` and the key=value overrides of a command line (Hydra's own flags left out)."""
    name, overrides, args = default_name, [], list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("--config-name", "-cn") and args:
            name = args.pop(0)
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg in ("--config-path", "-cp", "--config-dir", "-cd") and args:
            args.pop(0)
        elif not arg.startswith(("-", "hydra")) and ("=" in arg or arg.startswith("~")):  # ~key: a deletion
            overrides.append(arg)  # (Hydra's own settings are not config keys)
    return name, overrides


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """A config file (e.g. ``examples/nlp/gpt/conf/gpt_spin.yaml``) as a script would see it: its Hydra defaults
    list applied, this package's resolvers (``${embedded_data:...}``, ``${int_div:...}``) registered, then
    ``overrides``. Plain ``OmegaConf.load`` cannot resolve those interpolations."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    return compose_config(path.parent, path.stem, overrides)
