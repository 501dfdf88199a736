"""One SFT step is the same for any micro batch size and any data-parallel size (masked samples, uneven lengths)."""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core import parallel_state

from nemo_aligner.data.nlp.builders import build_collate, build_sft_dataset, build_train_sampler
from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel
from nemo_aligner.tokenizers import build_tokenizer
from nemo_aligner.utils.distributed import set_model_parallel_from_config
from tests.conftest import tiny_model_cfg
from tests.distributed.multiprocess import run_distributed

GLOBAL_BATCH = 8
# Adam's first step is lr * g / (|g| + eps): a larger eps keeps fp32 rounding in near-zero gradients from
# being amplified to lr-sized weight differences, so weights can be compared tightly.
OPTIM = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.01,
    "betas": [0.9, 0.98],
    "eps": 1e-4,
    "sched": {"name": "Constant"},
}
# Six samples of very different lengths in a global batch of 8: the last two entries are all-masked fillers.
SAMPLES = [
    {"input": "add 1 and 2", "output": "3"},
    {"input": "reverse: a much longer word list here", "output": "ereh tsil drow regnol hcum a"},
    {"input": "x", "output": "y"},
    {"input": "sort 9 1 5 3", "output": "1 3 5 9"},
    {"input": "uppercase: hello there", "output": "HELLO THERE"},
    {"input": "max of 1, 2", "output": "2"},
]


def _split_cfg(path: str) -> dict:
    return {"file_path": path, "max_seq_length": 64, "drop_last": False, "shuffle": False, "add_eos": True}


def one_sft_step(data_path: str, micro_batch_size: int) -> dict:
    """Build the model (same init everywhere), take one optimizer step on this rank's share, return the result."""
    cfg = tiny_model_cfg(micro_batch_size=micro_batch_size, global_batch_size=GLOBAL_BATCH)
    set_model_parallel_from_config(cfg)  # this rank's launcher step
    model = GPTSFTModel(cfg)
    tokenizer = model.tokenizer
    split_cfg = _split_cfg(data_path)
    dataset = build_sft_dataset({"chat": False}, split_cfg, tokenizer, seed=1)
    sampler = build_train_sampler(
        split_cfg,
        dataset,
        GLOBAL_BATCH,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
        seed=1,
    )
    batch = build_collate(split_cfg, tokenizer)([dataset[i] for i in next(iter(sampler))])
    optimizer, _ = model.setup_optimization(OPTIM, max_steps=10, gradient_clip_val=1.0)
    model.prepare_for_training_step()
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    return {
        "loss": loss,
        "num_tokens": metrics["num_tokens"],
        "grad_norm": grad_norm,
        "weights": model.model_state_dict_in_cpu(),
    }


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SAMPLES))
    return str(path)


def _assert_same_step(a: dict, b: dict, atol: float) -> None:
    assert a["num_tokens"] == b["num_tokens"]
    assert abs(a["loss"] - b["loss"]) < 1e-6
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    for key in a["weights"]:
        assert torch.allclose(a["weights"][key], b["weights"][key], atol=atol, rtol=0), key


def test_micro_batch_size_does_not_change_the_step(data_path):
    one, four = one_sft_step(data_path, 1), one_sft_step(data_path, 4)
    # Reference by hand: the loss is the mean over every scored token of the 6 real samples (fillers add none).
    tokenizer = build_tokenizer({"library": "byte-level"})
    answer_tokens = sum(len(tokenizer.text_to_ids(" " + s["output"])) + 1 for s in SAMPLES)  # " {output}" + EOS
    assert one["num_tokens"] == answer_tokens
    _assert_same_step(one, four, atol=1e-6)


@pytest.mark.distributed
def test_data_parallel_2_equals_one_process(tmp_path, data_path):
    single = one_sft_step(data_path, 2)
    ranks = run_distributed(
        "tests.distributed.test_sft_parallel:one_sft_step",
        nprocs=2,
        out_dir=tmp_path,
        data_path=data_path,
        micro_batch_size=2,
    )
    for rank in ranks:
        # gloo sums the two ranks' gradients in a different order than one process: fp32 rounding only.
        _assert_same_step(single, rank, atol=1e-6)
