"""Shared test fixtures: tiny model configs and the NeMo-written golden files."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from nemo_aligner.utils.device import current_device
from tests import device_guard

# Tensors made without device= in the project's compute code fail the test that makes them (see device_guard.py).
device_guard.install()

# The one decision of where the suite computes: the GPU when there is one, else the CPU. Models the tests build go
# there by themselves (MegatronGPTModel puts its parameters on current_device(); forward, get_logprobs and
# forward_backward move CPU inputs to the model). Tests bring results back with .cpu() before comparing them with
# CPU expectations, and take their tolerances from tolerance().
COMPUTE_DEVICE = current_device()
ON_GPU = COMPUTE_DEVICE.type == "cuda"


def tolerance(cpu: float, gpu: float | None = None) -> float:
    """A comparison tolerance: ``cpu`` on the CPU; on a GPU ``gpu`` (bf16 or TF32 kernels, other reduction orders),
    by default 100x ``cpu`` (float32 kernels of another summation order, never looser than 1e-4)."""
    if not ON_GPU:
        return cpu
    return gpu if gpu is not None else max(100 * cpu, 1e-4)


@pytest.fixture(scope="session")
def compute_device() -> torch.device:
    return COMPUTE_DEVICE


@pytest.fixture(scope="session", autouse=True)
def megatron_parallel_state() -> None:
    """megatron-core's parallel state for the test process (one rank: TP 1, PP 1), set up as a run's launcher does
    before a model is built; models never set it up themselves. A test that needs other sizes (a rank started by
    ``tests.distributed.multiprocess``) calls ``set_model_parallel_from_config(cfg)`` as a launcher would."""
    from nemo_aligner.utils.distributed import initialize_distributed

    initialize_distributed()


FIXTURES = Path(__file__).parent / "fixtures"
NEMO_FIXTURES = FIXTURES / "nemo"
NEMO_FIXTURE_NAMES = ("tiny_gpt_ln_gelu_abs", "tiny_gpt_rms_swiglu_rope_gqa", "tiny_gpt_ln_swiglu_rope50")

TINY_MODEL_CFG = {
    "mcore_gpt": True,
    "num_layers": 2,
    "hidden_size": 64,
    "ffn_hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "encoder_seq_length": 64,
    "max_position_embeddings": 64,
    "position_embedding_type": "rope",
    "rotary_base": 10000,
    "rotary_percentage": 1.0,
    "normalization": "rmsnorm",
    "layernorm_epsilon": 1e-5,
    "activation": "fast-swiglu",
    "bias": False,
    "share_embeddings_and_output_weights": False,
    "make_vocab_size_divisible_by": 128,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "init_method_std": 0.02,
    "precision": 32,
    "megatron_amp_O2": False,
    "transformer_engine": False,
    "tensor_model_parallel_size": 1,
    "pipeline_model_parallel_size": 1,
    "seed": 1234,
    "tokenizer": {"library": "byte-level"},
}


def tiny_model_cfg(**overrides) -> dict:
    """A tiny Llama-style model config (byte-level tokenizer); keyword arguments override keys."""
    cfg = copy.deepcopy(TINY_MODEL_CFG)
    cfg.update(overrides)
    return cfg


@contextlib.contextmanager
def captured_log(name: str, level: int | None = None) -> Iterator[list[logging.LogRecord]]:
    """The records logger ``name`` handles meanwhile (for a module- or session-scoped fixture, where pytest's
    function-scoped ``caplog`` is not available); ``level`` sets the logger's level for the time."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    target = logging.getLogger(name)
    old_level = target.level
    target.addHandler(handler)
    if level is not None:
        target.setLevel(level)
    try:
        yield records
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight away from its initial value (norm gammas off 1, biases off 0), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32, device="cpu")
            param.add_((0.2 if param.dim() == 1 else 0.1) * noise.to(param.device, param.dtype))


@pytest.fixture(scope="session")
def nemo_fixtures_dir() -> Path:
    return NEMO_FIXTURES


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory) -> Path:
    """The embedded default's tiny model after a short SFT run (built once per test session)."""
    from scripts.build_tiny_base_model import build_tiny_base_model

    return build_tiny_base_model(steps=150, cache_dir=tmp_path_factory.mktemp("tiny_model_cache"))


@pytest.fixture(scope="session")
def tiny_judge_model(tmp_path_factory) -> Path:
    """The embedded default's model trained to answer, judge and meta-judge (built once per test session)."""
    from scripts.build_tiny_base_model import build_tiny_base_model

    return build_tiny_base_model(steps=80, cache_dir=tmp_path_factory.mktemp("judge_model_cache"), with_judge=True)


@pytest.fixture(scope="session")
def one_step_sft_checkpoint(tmp_path_factory) -> Path:
    """A real trainer checkpoint (one SFT step of the embedded default) for tests that damage or tamper with it."""
    from examples.nlp.gpt.train_gpt_sft import main
    from nemo_aligner.checkpoint.trainer_checkpoint import list_checkpoints
    from nemo_aligner.utils.config import compose_config
    from tests.functional.sft_runs import SCRIPTS

    results = tmp_path_factory.mktemp("one_step_sft")
    overrides = [
        f"exp_manager.explicit_log_dir={results}",
        "trainer.sft.max_steps=1",
        "trainer.sft.val_check_interval=1",
        "trainer.sft.limit_val_batches=1",
        "model.data.train_ds.global_batch_size=2",
        "model.data.train_ds.micro_batch_size=1",
    ]
    main(compose_config(SCRIPTS / "conf", "gpt_sft_tiny", overrides))
    (checkpoint,) = list_checkpoints(results / "checkpoints")
    return checkpoint


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: on a machine without it they are reported as skipped (not run), never passed."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: not run on this machine (GPU-only path, not verified here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    if device_guard.COLLECT:
        print("\ndevice guard offenders:\n" + "\n".join(sorted(device_guard.collected)))
