"""The Dockerfile cannot be built here (no docker, no GPU): check what it says instead."""

from __future__ import annotations

import re
import shlex
from importlib.metadata import version

from tests.docs.doc_commands import REPO, check_pip_install

DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(line.split(maxsplit=1)) for line in lines]


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for name, arg in instructions() if name == "ARG" and "=" in arg)


def test_base_is_nvidias_pytorch_container():
    (image,) = [arg for name, arg in instructions() if name == "FROM"]
    image = re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m.group(1)], image)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", image), image


def test_installs_the_package_with_transformer_engine_and_the_validated_megatron_core():
    (run,) = [arg for name, arg in instructions() if name == "RUN" and "pip install" in arg]
    install = shlex.split(run.split("&&")[0].replace("${MCORE_VERSION}", build_args()["MCORE_VERSION"]))
    assert install[:2] == ["pip", "install"]
    check_pip_install([a for a in install[1:] if not a.startswith("megatron-core==")])
    assert ".[gpu,wandb]" in install, "the [gpu] extra brings TransformerEngine"
    assert f"megatron-core=={version('megatron-core')}" in install, "pin the megatron-core version CI tests"
    assert "transformer_engine.pytorch" in run, "the build checks that TransformerEngine imports"
