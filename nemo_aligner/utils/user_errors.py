"""User errors end a command with their message, not a traceback.

A wrong config key, a broken data file, a missing or damaged checkpoint, a results directory in use or a run that
went non-finite is something the user fixes, and the message already names the key, file:line or checkpoint: a
Python traceback around it only hides it. :func:`exit_on_user_error` wraps an entry script's ``main`` (the
:func:`~nemo_aligner.utils.config.hydra_runner` decorator applies it to every command-line run) so that such an
error prints ``error: <message>`` on stderr and exits with status 1, and Ctrl-C outside the training loop (which
handles it as a stop request) exits with status 130 and one line. ``HYDRA_FULL_ERROR=1`` shows the traceback
again. Every other exception is an internal error and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 1
INTERRUPTED_EXIT = 130


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception types that report a user's mistake (imported here, not at module load: no import cycles)."""
    from nemo_aligner.checkpoint.nemo_file import NemoFormatError
    from nemo_aligner.checkpoint.trainer_checkpoint import CheckpointError
    from nemo_aligner.data.nlp.jsonl import DataError
    from nemo_aligner.utils.config_validation import ConfigError
    from nemo_aligner.utils.health import NonFiniteError
    from nemo_aligner.utils.run_lock import RunLockedError

    return (ConfigError, DataError, NemoFormatError, CheckpointError, FileNotFoundError, NonFiniteError, RunLockedError)


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """``main`` that reports user errors as one message and a non-zero exit status (see the module docstring)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return main(*args, **kwargs)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print(f"{_rank_prefix()}interrupted (Ctrl-C); no checkpoint was written", file=sys.stderr)
            sys.exit(INTERRUPTED_EXIT)
        except user_error_types() as err:
            print(f"{_rank_prefix()}error: {err}", file=sys.stderr)
            sys.exit(USER_ERROR_EXIT)

    return wrapper


def _rank_prefix() -> str:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
