"""The device module: one answer for "where do tensors live", and a mover that keeps structure."""

from collections import namedtuple

import torch

from nemo_aligner.utils.device import current_device, model_device, to_device


def test_model_device_is_the_parameters_device_and_current_device_without_parameters():
    assert model_device(torch.nn.Linear(2, 2).to("meta")) == torch.device("meta")
    assert model_device([torch.nn.Identity(), torch.nn.Linear(2, 2).to("meta")]) == torch.device("meta")
    assert model_device(torch.nn.Identity()) == current_device()
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert current_device() == expected


def test_to_device_moves_every_nested_tensor_and_keeps_the_structure():
    Pair = namedtuple("Pair", "a b")
    batch = {"tokens": torch.ones(2), "nested": [torch.zeros(1), (torch.ones(1), "x")], "pair": Pair(torch.ones(1), 3)}
    moved = to_device(batch, "meta")
    assert moved["tokens"].device.type == "meta"
    assert moved["nested"][0].device.type == "meta" and moved["nested"][1][0].device.type == "meta"
    assert moved["nested"][1][1] == "x" and isinstance(moved["nested"][1], tuple)
    assert isinstance(moved["pair"], Pair) and moved["pair"].a.device.type == "meta" and moved["pair"].b == 3
    same = torch.ones(1)
    assert to_device(same, "cpu") is same


def test_cuda_is_used_when_present_unless_the_process_is_told_to_compute_on_the_cpu(monkeypatch):
    from nemo_aligner.utils import cpu_support

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv(cpu_support.DEVICE_ENV, raising=False)
    assert cpu_support.uses_cuda() and cpu_support.process_group_backend() == "nccl"
    monkeypatch.setenv(cpu_support.DEVICE_ENV, "cpu")  # what the multi-process tests set with fewer GPUs than ranks
    assert not cpu_support.uses_cuda() and cpu_support.process_group_backend() == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(cpu_support.DEVICE_ENV)
    assert not cpu_support.uses_cuda() and cpu_support.process_group_backend() == "gloo"
