"""SPIN end to end on the embedded default: learning signal, kill-and-resume, the user guide's command and API."""

from __future__ import annotations

import csv
import math
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from examples.nlp.gpt.train_gpt_spin import main as spin_main
from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.data.nlp.builders import build_sft_dataset
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.config_validation import ConfigError
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import REPO, SCRIPTS

EMBEDDED = REPO / "nemo_aligner" / "data" / "embedded"
# Two short iterations: 3 steps each, generation in several rollout batches (so a kill can land inside it).
FAST_SPIN = [
    "trainer.spin.max_iterations=2",
    "trainer.spin.limit_train_batches=3",
    "trainer.spin.val_check_interval=3",
    "trainer.spin.save_interval=2",
    "trainer.spin.limit_val_batches=1",
    "model.global_batch_size=16",
    "model.micro_batch_size=8",
    "model.spin.rollout_micro_batch_size=16",
]


def spin_config(log_dir, model_path, *overrides):
    return compose_config(
        SCRIPTS / "conf",
        "gpt_spin_tiny",
        [
            f"exp_manager.explicit_log_dir={log_dir}",
            f"pretrained_checkpoint.restore_from_path={model_path}",
            *overrides,
        ],
    )


def run_spin_subprocess(log_dir, model_path, *overrides, env=None):
    cmd = [
        sys.executable,
        str(SCRIPTS / "train_gpt_spin.py"),
        "--config-name",
        "gpt_spin_tiny",
        f"exp_manager.explicit_log_dir={log_dir}",
        f"pretrained_checkpoint.restore_from_path={model_path}",
        *overrides,
    ]
    return subprocess.run(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def final_weights(log_dir):
    with open_nemo(log_dir / "checkpoints" / "megatron_gpt_spin.nemo") as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


@pytest.mark.slow
def test_kill_during_rollout_and_during_training_then_resume_gives_identical_weights(tmp_path, tiny_sft_model):
    clean = run_spin_subprocess(tmp_path / "clean", tiny_sft_model, *FAST_SPIN)
    assert clean.returncode == 0, clean.stderr[-3000:]
    expected = final_weights(tmp_path / "clean")
    # Iteration 1's rollout (its second generation batch) and iteration 2's second training step.
    for name, point in (("rollout", "rollout:6"), ("training", "after_step:5")):
        log_dir = tmp_path / name
        killed = run_spin_subprocess(log_dir, tiny_sft_model, *FAST_SPIN, env={"NEMO_ALIGNER_KILL_AT": point})
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
        resumed = run_spin_subprocess(log_dir, tiny_sft_model, *FAST_SPIN)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        actual = final_weights(log_dir)
        for key in expected:
            assert torch.equal(expected[key], actual[key]), (name, key)


@pytest.mark.slow
def test_one_iteration_teaches_the_policy_to_prefer_ground_truth(tmp_path, tiny_sft_model):
    spin_main(
        spin_config(tmp_path, tiny_sft_model, "trainer.spin.max_iterations=1", "trainer.spin.limit_train_batches=40")
    )
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel

    trained = MegatronGPTModel.restore_from(tmp_path / "checkpoints" / "megatron_gpt_spin.nemo").eval()
    start = MegatronGPTModel.restore_from(tiny_sft_model).eval()
    data_cfg = {"chat": True}
    held_out = build_sft_dataset(
        data_cfg, {"file_path": str(EMBEDDED / "chat_test.jsonl"), "max_seq_length": 128}, start.tokenizer, seed=0
    )
    indices = list(range(len(held_out)))  # all 300 held-out prompts
    prompts = [list(held_out.prompt_and_answer(i)[0]) for i in indices]
    sampling = OmegaConf.load(SCRIPTS / "conf" / "gpt_spin.yaml").model.spin.sampling_params
    generated = start.generate(
        prompts, sampling, {"max_length": 24, "min_length": 1}, seeds=[10_000 + i for i in indices]
    )

    def logp(model, prompt, response):
        tokens = torch.tensor([prompt + response])
        with torch.no_grad():
            return model.get_logprobs(tokens)[0, len(prompt) - 1 :].sum().item()

    wins, identical = 0.0, 0
    for i, response in zip(indices, generated.response_ids):
        prompt, actual = prompts[i], list(held_out.prompt_and_answer(i)[1])
        margin = (logp(trained, prompt, actual) - logp(start, prompt, actual)) - (
            logp(trained, prompt, response) - logp(start, prompt, response)
        )
        identical += response == actual
        wins += 0.5 if response == actual else float(margin > 0)
    rate = wins / len(indices)
    print(
        f"held-out: implicit reward prefers the ground truth over a fresh reference generation in {rate:.3f} "
        f"({identical} of {len(indices)} generations equal the ground truth and count 1/2)"
    )
    # Better than chance (0.5) at 1 % significance: one-sided binomial bound 0.5 + 2.33 * sqrt(0.25 / n).
    assert rate > 0.5 + 2.33 * math.sqrt(0.25 / len(indices))


SPIN_COMMAND = """python -u ${GPFS}/examples/nlp/gpt/train_gpt_spin.py \
   trainer.num_nodes=1 trainer.devices=8 \
   model.micro_batch_size=1 model.global_batch_size=64 \
   pretrained_checkpoint.restore_from_path=/path/to/megatron_gpt_sft.nemo \
   "model.data.train_ds.file_path=${TRAIN_DATA_PATH}" \
   "model.data.validation_ds.file_path=${VALID_DATA_PATH}" \
   exp_manager.create_wandb_logger=false \
   exp_manager.wandb_logger_kwargs.project=spin_training \
   exp_manager.wandb_logger_kwargs.name=spin_training \
   exp_manager.explicit_log_dir=/results \
   trainer.spin.max_iterations=1 trainer.spin.max_epochs=1 \
   model.spin.ref_policy_kl_penalty=0.1 \
   model.spin.length_params.max_length=2048"""

SCALE_DOWN = [
    "trainer.devices=1",
    "model.global_batch_size=4",
    "trainer.spin.limit_train_batches=2",
    "trainer.spin.limit_val_batches=1",
    "model.spin.length_params.max_length=32",
    "model.spin.rollout_micro_batch_size=8",
    *FP32,
]


def spin_command_overrides(**paths):
    command = SPIN_COMMAND
    for name, value in paths.items():
        command = command.replace("${" + name + "}", value)
    return shlex.split(command)[3:]


@pytest.mark.slow
def test_user_guide_spin_command_runs_with_the_scale_down_suffix(tmp_path, tiny_sft_model):
    overrides = spin_command_overrides(
        GPFS=str(REPO),
        TRAIN_DATA_PATH=str(EMBEDDED / "chat_train.jsonl"),
        VALID_DATA_PATH=str(EMBEDDED / "chat_validation.jsonl"),
    )
    overrides = [
        o.replace("/path/to/megatron_gpt_sft.nemo", str(tiny_sft_model)).replace("/results", str(tmp_path))
        for o in overrides
    ]
    spin_main(compose_config(SCRIPTS / "conf", "gpt_spin", overrides + SCALE_DOWN))
    assert (tmp_path / "checkpoints" / "megatron_gpt_spin.nemo").is_file()
    # The final .nemo is a plain GPT.
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel

    MegatronGPTModel.restore_from(tmp_path / "checkpoints" / "megatron_gpt_spin.nemo")


def test_user_guide_spin_command_composes_and_validates_without_the_suffix(tmp_path):
    overrides = spin_command_overrides(
        GPFS="/repo", TRAIN_DATA_PATH=str(tmp_path / "t.jsonl"), VALID_DATA_PATH=str(tmp_path / "v.jsonl")
    )
    cfg = compose_config(SCRIPTS / "conf", "gpt_spin", overrides)
    assert (
        cfg.trainer.devices == 8
        and cfg.model.global_batch_size == 64
        and cfg.model.spin.length_params.max_length == 2048
    )
    from nemo_aligner.utils.train_script_utils import validate_spin_config

    with pytest.raises(ConfigError) as info:  # placeholder paths: validation names them, nothing runs
        validate_spin_config(cfg, cfg.model, world_size=8)
    assert "restore_from_path" in str(info.value) and "t.jsonl" in str(info.value)


def test_kl_penalty_list_shorter_than_iterations_is_a_config_error(tmp_path, nemo_fixtures_dir):
    cfg = spin_config(
        tmp_path, nemo_fixtures_dir / "tiny_gpt_rms_swiglu_rope_gqa.nemo", "trainer.spin.max_iterations=4"
    )
    with pytest.raises(
        ConfigError, match=r"ref_policy_kl_penalty: has 3 values but trainer\.spin\.max_iterations is 4"
    ):
        spin_main(cfg)


def test_lora_outside_sft_and_dpo_is_a_config_error(tmp_path, nemo_fixtures_dir):
    """SPIN's reference moves every iteration: adapters-off is no reference for it, so model.peft is refused."""
    model_path = nemo_fixtures_dir / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    cfg = spin_config(tmp_path, model_path, "++model.peft.peft_scheme=lora")
    with pytest.raises(
        ConfigError, match=r"model\.peft\.peft_scheme: LoRA is supported by SFT and DPO, not by trainer\.spin"
    ):
        spin_main(cfg)


@pytest.mark.slow
def test_custom_pipeline_example_from_the_user_docs(tmp_path, tiny_sft_model):
    """The usage example of NeMo-Aligner's MegatronGPTSPINModel page, as written, with our trainer."""
    from nemo_aligner.algorithms.spin import SPINTrainer, spin_custom_collate  # noqa: F401 (the documented import)
    from nemo_aligner.utils.train_script_utils import model_config_for_training, resolve_and_create_trainer
    from nemo_aligner.utils.utils import load_from_nemo, retrieve_model_state_dict_in_cpu

    cfg = spin_config(tmp_path, tiny_sft_model)
    trainer = resolve_and_create_trainer(cfg, "spin")
    cfg.model = model_config_for_training(cfg, cfg.pretrained_checkpoint.restore_from_path)

    ptl_model = load_from_nemo(
        MegatronGPTSPINModel,
        cfg.model,
        trainer,
        strict=True,
        restore_path=cfg.pretrained_checkpoint.restore_from_path,
    )
    # Initialize reference policy from the pretrained model weights
    ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
        ptl_model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False)
    )
    ptl_model.ref_policy_state_dict = ref_policy_state_dict
    # Set KL penalty for iteration 0
    ptl_model.set_KL_penalty_by_iteration(0)

    assert ptl_model.ref_policy_kl_penalty == cfg.model.spin.ref_policy_kl_penalty[0]
    assert set(ref_policy_state_dict) == set(ptl_model.model_state_dict_in_cpu())


@pytest.mark.slow
def test_mixing_previous_generations_trains_on_both_iterations(tmp_path, tiny_sft_model):
    """With mix_previous_generations iteration 2 draws prompt i together with its iteration-1 pair (index N + i)."""
    import torch as _torch

    from nemo_aligner.data.nlp.pairs import SPINBatchSampler

    spin_main(
        spin_config(
            tmp_path,
            tiny_sft_model,
            *FAST_SPIN,
            "trainer.spin.mix_previous_generations=true",
        )
    )
    second = _torch.load(tmp_path / "spin_rollouts" / "iteration_1.pt", weights_only=True)
    size = 3000
    assert second["previous"]["indices"]  # iteration 1's generations travel into iteration 2
    scored = set(second["reference"]["sample_index"].tolist())
    assert any(i >= size for i in scored)  # and they are scored by iteration 2's reference
    sampler = SPINBatchSampler(8, 4, seed=0, shuffle=False, drop_last=True)
    sampler.mix_previous = True
    assert next(iter(sampler)) == [0, 1, 2, 3, 8, 9, 10, 11]
    # NeMo-Aligner's logged bookkeeping: samples keep counting across the two iterations of 3 steps (batch 16)
    with open(tmp_path / "csv" / "metrics.csv") as f:
        train = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [float(r["train/consumed_samples"]) for r in train] == [16.0 * step for step in range(1, 7)]
    assert [float(r["train/iteration"]) for r in train] == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_reference_from_generation_equals_a_forward_and_skips_the_generated_rows(tmp_path, tiny_sft_model, monkeypatch):
    """The generated responses' reference log-probs recorded by generation equal a forward pass's (float rounding
    apart), and the reference pass then forwards only the ground truth (and previous-iteration generations).

    lr 0 keeps the weights fixed, so both runs generate the same responses in both iterations and their reference
    tables can be compared entry by entry (iteration 2 includes the mixed-in iteration-1 pairs)."""
    from nemo_aligner.models.nlp.gpt import megatron_gpt_dpo_model

    forward = megatron_gpt_dpo_model._forward
    rows: dict[str, int] = {}

    def counting_forward(chunk, tokens):
        if not torch.is_grad_enabled():  # reference scoring (training forwards need gradients)
            rows[run] = rows.get(run, 0) + tokens.shape[0]
        return forward(chunk, tokens)

    monkeypatch.setattr(megatron_gpt_dpo_model, "_forward", counting_forward)
    tables = {}
    for run, flag in (("forward", "false"), ("generation", "true")):
        spin_main(
            spin_config(
                tmp_path / run,
                tiny_sft_model,
                *FAST_SPIN,
                "trainer.spin.mix_previous_generations=true",
                "model.optim.lr=0.0",
                "model.optim.sched.min_lr=0.0",
                "model.spin.prefix_sharing=false",  # two rows per pair, so the rows forwarded can be counted
                f"model.spin.reference_from_generation={flag}",
            )
        )
        tables[run] = [
            torch.load(tmp_path / run / "spin_rollouts" / f"iteration_{t}.pt", weights_only=True) for t in (0, 1)
        ]
    size, rows_per_forward = 3000, 2 * 16  # log_prob_forward_micro_batch_size 16 in gpt_spin_tiny
    expected = {"forward": 0, "generation": 0}
    for by_forward, by_generation in zip(tables["forward"], tables["generation"]):
        assert by_forward["generated"] == by_generation["generated"]
        a, b = by_forward["reference"], by_generation["reference"]
        order_a, order_b = a["sample_index"].argsort(), b["sample_index"].argsort()
        assert torch.equal(a["sample_index"][order_a], b["sample_index"][order_b])
        torch.testing.assert_close(b["chosen"][order_b], a["chosen"][order_a], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b["rejected"][order_b], a["rejected"][order_a], rtol=1e-5, atol=1e-4)
        deviation = (b["rejected"][order_b] - a["rejected"][order_a]).abs().max().item()
        print(f"generated responses' reference sums: generation vs forward, max |difference| {deviation:.2e}")
        # the current generations' values are the decoder's own records, not a forward's
        positions = {int(i): n for n, i in enumerate(b["sample_index"].tolist())}
        current = torch.tensor([positions[i] for i in by_generation["indices"]])
        assert torch.equal(b["rejected"][current], torch.tensor(by_generation["generated_logprob_sums"]))
        pairs, previous = len(a["sample_index"]), int((a["sample_index"] >= size).sum())
        # both sides of every pair, in micro batches padded with filler pairs
        expected["forward"] += rows_per_forward * math.ceil(pairs / (rows_per_forward // 2))
        # the ground truth of every pair and the previous iteration's generations, padded to whole micro batches
        expected["generation"] += rows_per_forward * math.ceil((pairs + previous) / rows_per_forward)
    assert previous > 0  # iteration 2 mixed in iteration 1's pairs
    assert rows == expected
