"""One DPO step is the same for micro batch 1 and 4, at DP=2 and at TP=2 (masked pairs, uneven lengths)."""

from __future__ import annotations

import json

import pytest
import torch
from megatron.core import parallel_state

from nemo_aligner.algorithms.dpo import compute_reference_logprobs
from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataloader, build_dpo_dataset
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo
from tests.conftest import perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed

GLOBAL_BATCH = 8
# Adam's first step is lr * g / (|g| + eps): a larger eps keeps fp32 rounding in near-zero gradients from
# being amplified to lr-sized weight differences, so weights can be compared tightly.
OPTIM = {
    "name": "adamw",
    "lr": 1e-3,
    "weight_decay": 0.0,
    "betas": [0.9, 0.98],
    "eps": 1e-4,
    "sched": {"name": "Constant"},
}
DATA = {"seq_length": 128, "shuffle": False, "drop_last": False}


def one_dpo_step(
    model_path: str, data_path: str, micro_batch_size: int, tp: int, save_path: str | None, spin: bool = False
) -> dict:
    """One step of DPO (or of SPIN: the same loss on (actual, generated) pairs, its own model class and keys)."""
    settings = {"ref_policy_kl_penalty": 0.5, "preference_loss": "dpo", "sft_loss_weight": 0.1}
    overrides = {
        "tensor_model_parallel_size": tp,
        "micro_batch_size": micro_batch_size,
        "global_batch_size": GLOBAL_BATCH,
        ("spin" if spin else "dpo"): settings,
        "data": DATA,
    }
    cfg = load_and_override_model_config(model_path, overrides)
    model = restore_at_layout(MegatronGPTSPINModel if spin else MegatronGPTDPOModel, cfg, model_path)
    dataset = build_dpo_dataset(cfg.data, data_path, model.tokenizer)
    loader = build_dpo_dataloader(
        cfg.data,
        dataset,
        model.tokenizer,
        GLOBAL_BATCH,
        train=True,
        data_parallel_rank=parallel_state.get_data_parallel_rank(),
        data_parallel_size=parallel_state.get_data_parallel_world_size(),
    )
    reference = compute_reference_logprobs(model, [next(iter(loader))])
    optimizer, _ = model.setup_optimization(OPTIM, max_steps=10, gradient_clip_val=1.0)
    model.prepare_for_training_step()
    batch = reference.attach(next(iter(loader)))
    loss, metrics = model.get_loss_and_metrics(batch, forward_only=False)
    _, grad_norm, _ = optimizer.step()
    if save_path:
        model.save_to(save_path)
    return {"loss": loss, "metrics": metrics, "grad_norm": grad_norm, "weights": model.model_state_dict_in_cpu()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, nemo_fixtures_dir):
    root = tmp_path_factory.mktemp("dpo_parallel")
    model = MegatronGPTModel(
        tiny_model_cfg(
            tokenizer={"library": "byte-level", "special_tokens": ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]}
        )
    )
    perturb_(model, seed=3)
    model.save_to(root / "start.nemo")
    # Six pairs of very different lengths in a global batch of 8: the last two entries are masked fillers.
    embedded = nemo_fixtures_dir.parents[1].parent / "nemo_aligner" / "data" / "embedded" / "dpo_train.jsonl"
    lines = [json.loads(line) for line in open(embedded)][:6]
    lines[1]["chosen_response"] = "a much longer answer than the others\n<extra_id_1>"
    (root / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(root / "start.nemo"), str(root / "pairs.jsonl"), root


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a["metrics"]["num_pairs"] == b["metrics"]["num_pairs"] == 6
    for key in ("loss", "acc", "sft_loss", "rewards_all_mean", "rewards_all_std"):
        assert abs(a["metrics"][key] - b["metrics"][key]) < 1e-5, key
    assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    for key in a["weights"]:
        assert torch.allclose(a["weights"][key], b["weights"][key], atol=atol, rtol=0), key


def test_micro_batch_size_does_not_change_the_step(inputs):
    model_path, data_path, _ = inputs
    one = one_dpo_step(model_path, data_path, 1, 1, None)
    four = one_dpo_step(model_path, data_path, 4, 1, None)
    # Step 0: policy == reference, so the preference loss is log 2 for each valid pair.
    assert one["metrics"]["preference_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    _assert_same(one, four, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "tp2"])
def test_two_processes_equal_one(tmp_path, inputs, tp):
    model_path, data_path, _ = inputs
    single = one_dpo_step(model_path, data_path, 2, 1, None)
    save_path = str(tmp_path / "after.nemo")
    ranks = run_distributed(
        "tests.distributed.test_dpo_parallel:one_dpo_step",
        nprocs=2,
        out_dir=tmp_path / "out",
        model_path=model_path,
        data_path=data_path,
        micro_batch_size=2,
        tp=tp,
        save_path=save_path,
    )
    after = load_from_nemo(
        MegatronGPTModel,
        load_and_override_model_config(save_path, {"tensor_model_parallel_size": 1}),
        restore_path=save_path,
    )
    merged = {
        "metrics": ranks[0]["metrics"],
        "grad_norm": ranks[0]["grad_norm"],
        "loss": ranks[0]["loss"],
        "weights": after.model_state_dict_in_cpu(),
    }
    # Two ranks reduce in a different order than one process: fp32 rounding only.
    _assert_same(single, merged, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_spin_step_same_for_micro_batch_1_4_and_data_parallel_2(tmp_path, inputs):
    """SPIN: the pairs' rejected side is the generation; two fillers are masked pairs in the global batch."""
    model_path, data_path, _ = inputs
    one = one_dpo_step(model_path, data_path, 1, 1, None, spin=True)
    assert "rewards_actual_mean" in one["metrics"]
    _assert_same(one, one_dpo_step(model_path, data_path, 4, 1, None, spin=True), atol=1e-6)
    ranks = run_distributed(
        "tests.distributed.test_dpo_parallel:one_dpo_step",
        nprocs=2,
        out_dir=tmp_path / "out",
        model_path=model_path,
        data_path=data_path,
        micro_batch_size=2,
        tp=1,
        save_path=None,
        spin=True,
    )
    for rank in ranks:
        _assert_same(one, rank, atol=1e-6)
