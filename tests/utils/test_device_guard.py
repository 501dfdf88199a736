"""The device guard of the test suite (tests/device_guard.py) catches a planted device mistake, file and line."""

from __future__ import annotations

import pytest
import torch

from tests import device_guard


def _run_as(module_name: str, source: str) -> None:
    """Run ``source`` as if it were code of ``module_name`` (the guard looks at the caller's module)."""
    code = compile(source, f"{module_name.replace('.', '/')}.py", "exec")
    exec(code, {"__name__": module_name, "torch": torch})


@pytest.mark.parametrize(
    "mistake",
    [
        "positions = torch.arange(8)",  # the missing device= of cuda_failures.md's position ids
        "mask = torch.ones(4, 4, dtype=torch.bool).triu(1)",
        "table = torch.tensor([0.5, 1.5])",
        "generator = torch.Generator().manual_seed(3)",
        "noise = torch.rand((), dtype=torch.float64, generator=torch.Generator(device='cpu'))",
    ],
)
def test_a_planted_mistake_in_model_code_fails_with_file_and_line(mistake):
    with pytest.raises(device_guard.DeviceMistake, match=r"nemo_aligner/models/nlp/gpt/planted\.py:2: torch\."):
        _run_as("nemo_aligner.models.nlp.gpt.planted", "x = 1\n" + mistake + "\n")


def test_explicit_devices_host_side_modules_and_tensor_following_factories_pass():
    _run_as(
        "nemo_aligner.generation.planted",
        "w = torch.zeros(3, device='cpu')\n"
        "a = torch.arange(4, device=w.device)\n"
        "b = torch.zeros_like(w)\n"
        "c = torch.as_tensor(w)\n"
        "g = torch.Generator(device=w.device)\n",
    )
    _run_as("nemo_aligner.data.nlp.planted", "ids = torch.tensor([1, 2, 3])\n")  # data loading: CPU on purpose
    _run_as("tests.planted", "ids = torch.arange(3)\n")  # tests and libraries are not checked
    assert isinstance(torch.default_generator, torch.Generator)  # the guarded class still answers isinstance
