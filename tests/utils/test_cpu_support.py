"""The CPU-support module: patched megatron names still exist, and the patched behaviour is right."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

from nemo_aligner.utils import cpu_support, mcore_compat
from nemo_aligner.utils.distributed import initialize_distributed, start_process_group

PACKAGE = Path(cpu_support.__file__).resolve().parents[1]


@pytest.mark.parametrize("module_name, attribute", cpu_support.PATCHED_NAMES + mcore_compat.PATCHED_NAMES)
def test_patched_megatron_names_still_exist(module_name, attribute):
    # A megatron-core upgrade that moves or renames one of these must fail here, not silently on a user's CPU.
    assert hasattr(importlib.import_module(module_name), attribute), f"{module_name}.{attribute} is gone"


def test_rng_tracker_forks_reproducibly_on_cpu():
    initialize_distributed()
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    def dropout_masks():
        model_parallel_cuda_manual_seed(123)
        with get_cuda_rng_tracker().fork():
            first = torch.nn.functional.dropout(torch.ones(1000), 0.5)
        with get_cuda_rng_tracker().fork():
            second = torch.nn.functional.dropout(torch.ones(1000), 0.5)
        return first, second

    outer_before = torch.get_rng_state()
    a1, a2 = dropout_masks()
    b1, b2 = dropout_masks()
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # same seed, same masks
    assert not torch.equal(a1, a2)  # the forked stream advances
    assert torch.equal(outer_before, torch.get_rng_state())  # forks leave the default generator alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU redirection itself")
def test_cuda_device_requests_land_on_the_cpu():
    initialize_distributed()
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.arange(3, device=torch.cuda.current_device()).tolist() == [0, 1, 2]
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()


def test_no_device_branches_outside_the_cpu_support_module():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).as_posix() in ("utils/cpu_support.py", "utils/device.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"cuda\.is_available|device\.type\s*==|== ?[\"']cpu[\"']", line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "device branches belong in nemo_aligner/utils/cpu_support.py or device.py:\n" + "\n".join(
        offenders
    )


def test_apply_cpu_support_is_idempotent():
    first = cpu_support.apply_cpu_support()
    assert cpu_support.apply_cpu_support() == first
    assert "apply_cpu_support" in inspect.getsource(start_process_group)  # every way a process group starts


def _megatron_original(module_name: str, attribute: str):
    """``module_name.attribute`` as megatron-core ships it: a fresh copy of the module's source, not the patched one."""
    module = importlib.import_module(module_name)
    spec = importlib.util.spec_from_file_location(f"_pristine_{module_name}", module.__file__)
    pristine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pristine)
    return getattr(pristine, attribute)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU masks themselves")
def test_attention_masks_equal_megatrons_and_need_no_function_mode():
    initialize_distributed()
    from megatron.core.fusions import fused_softmax

    causal = _megatron_original("megatron.core.transformer.utils", "get_default_causal_mask")
    sliding = _megatron_original("megatron.core.transformer.utils", "get_sliding_window_causal_mask")
    for sq in (1, 2, 7, 16):
        expected = causal(sq)  # device="cuda": rewritten by the function mode
        with cpu_support.device_rewrites_suspended():
            assert torch.equal(fused_softmax.get_default_causal_mask(sq), expected)
        for skv, window in ((sq, (3, 0)), (sq, (0, 0)), (sq + 5, (4, 2)), (sq, (-1, 0))):
            expected = sliding(sq, skv, window)
            with cpu_support.device_rewrites_suspended():
                assert torch.equal(fused_softmax.get_sliding_window_causal_mask(sq, skv, window), expected)
    with cpu_support.device_rewrites_suspended(), pytest.raises((RuntimeError, AssertionError)):
        causal(4)  # outside the mode a CUDA request fails loudly on a machine without CUDA
