"""DPO end to end on the embedded default: the first step, the reference strategies, learning, the scoring tool."""

from __future__ import annotations

import csv
import json
import math
import shlex

import pytest

from examples.nlp.gpt.compute_reference_logprobs import main as score_main
from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.config_validation import ConfigError
from tests.cpu_fp32 import FP32
from tests.functional.dpo_runs import FAST_DPO, dpo_config
from tests.functional.sft_runs import SCRIPTS

EMBEDDED = SCRIPTS.parents[2] / "nemo_aligner" / "data" / "embedded"


def train_rows(log_dir) -> list[dict]:
    with open(log_dir / "csv" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


@pytest.mark.slow
def test_first_step_is_log2_and_reference_strategies_agree(tmp_path, tiny_sft_model):
    losses = {}
    for strategy in ("precomputed", "cpu_weight_swap"):
        log_dir = tmp_path / strategy
        dpo_main(dpo_config(log_dir, tiny_sft_model, *FAST_DPO, f"model.dpo.reference={strategy}"))
        rows = train_rows(log_dir)
        first = rows[0]
        # Policy == reference at step 0: every reward is 0 and the dpo loss is log 2 (fp32 rounding only).
        assert float(first["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
        for key in ("train/rewards_chosen_mean", "train/rewards_rejected_mean", "train/rewards_all_std"):
            assert abs(float(first[key])) < 1e-6
        losses[strategy] = [float(r["train/loss"]) for r in rows]
    assert len(losses["precomputed"]) == 3
    assert losses["precomputed"] == pytest.approx(losses["cpu_weight_swap"], abs=1e-5)
    assert list((tmp_path / "precomputed" / "reference_logprobs").glob("train-*.pt"))


def score(model_path, data_path, output_path) -> list[dict]:
    score_main(
        compose_config(
            SCRIPTS / "conf",
            "compute_reference_logprobs",
            [
                f"pretrained_checkpoint.restore_from_path={model_path}",
                f"data_path={data_path}",
                f"output_path={output_path}",
                "model.dpo.log_prob_forward_micro_batch_size=16",
                *FP32,
            ],
        )
    )
    return [json.loads(line) for line in open(output_path)]


@pytest.mark.slow
def test_dpo_raises_held_out_preference_accuracy(tmp_path, tiny_sft_model):
    steps = ["trainer.dpo.max_steps=40", "trainer.dpo.val_check_interval=40", "model.optim.lr=3e-4"]
    dpo_main(dpo_config(tmp_path / "run", tiny_sft_model, *FAST_DPO, *steps, "model.global_batch_size=16"))
    trained = tmp_path / "run" / "checkpoints" / "megatron_gpt_dpo.nemo"
    test_file = EMBEDDED / "dpo_test.jsonl"
    before = score(tiny_sft_model, test_file, tmp_path / "before.jsonl")
    after = score(trained, test_file, tmp_path / "after.jsonl")
    # Implicit reward r = lp_trained - lp_start; ranking chosen above rejected on held-out pairs (ties 1/2).
    wins = 0.0
    for b, a in zip(before, after):
        margin = (a["chosen_logp"] - b["chosen_logp"]) - (a["rejected_logp"] - b["rejected_logp"])
        wins += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
    accuracy = wins / len(before)
    print(f"held-out implicit-reward accuracy after 40 DPO steps: {accuracy:.3f} on {len(before)} pairs")
    assert accuracy > 0.6


@pytest.mark.slow
def test_scoring_tool_keeps_order_and_reports_dropped_lines(tmp_path, tiny_sft_model):
    lines = [json.loads(line) for line in open(EMBEDDED / "dpo_validation.jsonl")][:5]
    lines[2]["chosen_response"] = "x" * 300 + "\n<extra_id_1>"  # longer than the 128-token context
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = score(tiny_sft_model, data, tmp_path / "scored.jsonl")
    assert [o["id"] for o in out] == [line["id"] for line in lines]
    assert out[2]["dropped"] is True and "chosen_logp" not in out[2]
    for o in out[:2] + out[3:]:
        assert o["chosen_logp"] < 0 and o["chosen_num_tokens"] == len(o["chosen_response"].replace("<extra_id_1>", "#"))


DPO_COMMAND = """python -u ${GPFS}/examples/nlp/gpt/train_gpt_dpo.py \
   trainer.num_nodes=1 trainer.devices=8 \
   ++model.micro_batch_size=1 ++model.global_batch_size=512 \
   pretrained_checkpoint.restore_from_path=/path/to/megatron_gpt_sft.nemo \
   "model.data.data_prefix={train: [${TRAIN_DATA_PATH}], validation: [${VALID_DATA_PATH}], test: [${VALID_DATA_PATH}]}" \
   exp_manager.create_wandb_logger=false \
   exp_manager.wandb_logger_kwargs.project=dpo_training \
   exp_manager.wandb_logger_kwargs.name=dpo_training \
   exp_manager.explicit_log_dir=/results \
   ++trainer.dpo.max_epochs=1 \
   ++model.dpo.ref_policy_kl_penalty=0.1"""

SCALE_DOWN = [
    "trainer.devices=1",
    "++model.global_batch_size=4",
    "++model.micro_batch_size=2",
    "trainer.dpo.max_steps=2",
    "trainer.dpo.val_check_interval=2",
    "trainer.dpo.limit_val_batches=1",
    *FP32,
]


def command_overrides(command: str, **paths: str) -> list[str]:
    for name, value in paths.items():
        command = command.replace("${" + name + "}", value)
    return shlex.split(command)[3:]


@pytest.mark.slow
def test_user_guide_dpo_command_runs_with_the_scale_down_suffix(tmp_path, tiny_sft_model):
    overrides = command_overrides(
        DPO_COMMAND,
        GPFS=str(SCRIPTS.parents[2]),
        TRAIN_DATA_PATH=str(EMBEDDED / "dpo_train.jsonl"),
        VALID_DATA_PATH=str(EMBEDDED / "dpo_validation.jsonl"),
    )
    overrides = [
        o.replace("/path/to/megatron_gpt_sft.nemo", str(tiny_sft_model)).replace("/results", str(tmp_path))
        for o in overrides
    ]
    dpo_main(compose_config(SCRIPTS / "conf", "gpt_dpo", overrides + SCALE_DOWN))
    assert (tmp_path / "checkpoints" / "megatron_gpt_dpo.nemo").is_file()


def test_user_guide_dpo_command_composes_and_validates_without_the_suffix(tmp_path):
    overrides = command_overrides(
        DPO_COMMAND,
        GPFS="/repo",
        TRAIN_DATA_PATH=str(tmp_path / "missing.jsonl"),
        VALID_DATA_PATH=str(tmp_path / "missing.jsonl"),
    )
    cfg = compose_config(SCRIPTS / "conf", "gpt_dpo", overrides)
    assert cfg.model.global_batch_size == 512 and cfg.trainer.devices == 8
    assert cfg.model.dpo.ref_policy_kl_penalty == 0.1
    from nemo_aligner.utils.train_script_utils import validate_dpo_config

    with pytest.raises(ConfigError) as info:  # the paths are placeholders: validation names them, nothing runs
        validate_dpo_config(cfg, cfg.model, world_size=8)
    message = str(info.value)
    assert "restore_from_path" in message and "missing.jsonl" in message
    assert "global_batch_size" not in message  # 512 = 1 x 64 x 8 is a consistent batch layout


def test_unknown_preference_loss_is_a_config_error(tmp_path, nemo_fixtures_dir):
    model_path = nemo_fixtures_dir / "tiny_gpt_rms_swiglu_rope_gqa.nemo"  # any .nemo: validation runs first
    cfg = dpo_config(tmp_path, model_path, *FAST_DPO, "model.dpo.preference_loss=kto")
    with pytest.raises(ConfigError, match=r"model\.dpo\.preference_loss: 'kto' is not one of"):
        dpo_main(cfg)


@pytest.mark.slow
def test_lora_reference_is_the_base_model_with_adapters_off(tmp_path, tiny_sft_model):
    """LoRA: precomputed reference and the per-step adapters-off reference give the same losses."""
    lora = ["model.peft.peft_scheme=lora", "model.peft.lora_tuning.adapter_dim=8", "model.optim.lr=1e-3"]
    losses = {}
    for strategy in ("precomputed", "cpu_weight_swap"):  # with LoRA the per-step reference is adapters-off
        log_dir = tmp_path / strategy
        dpo_main(dpo_config(log_dir, tiny_sft_model, *FAST_DPO, *lora, f"model.dpo.reference={strategy}"))
        rows = train_rows(log_dir)
        assert float(rows[0]["train/loss"]) == pytest.approx(math.log(2), abs=1e-6)
        losses[strategy] = [float(r["train/loss"]) for r in rows]
        assert (log_dir / "checkpoints" / "megatron_gpt_dpo.lora").is_dir()  # the adapters alone
        assert (log_dir / "checkpoints" / "megatron_gpt_dpo.nemo").is_file()  # merged, a plain GPT
    assert losses["precomputed"][2] < losses["precomputed"][0]
    assert losses["precomputed"] == pytest.approx(losses["cpu_weight_swap"], abs=1e-5)


@pytest.mark.slow
def test_resume_reuses_the_precomputed_reference(tmp_path, tiny_sft_model, caplog):
    dpo_main(dpo_config(tmp_path, tiny_sft_model, *FAST_DPO, "exp_manager.max_time_per_run=00:00:00:00"))
    assert [float(r["step"]) for r in train_rows(tmp_path)] == [1]  # stopped after one step, with a checkpoint
    caplog.clear()
    with caplog.at_level("INFO", logger="nemo_aligner"):
        dpo_main(dpo_config(tmp_path, tiny_sft_model, *FAST_DPO))
    messages = [r.getMessage() for r in caplog.records]
    assert any("Reusing precomputed reference log-probs" in m for m in messages)
    assert any("Resumed at step 1" in m for m in messages)
    assert [r["step"] for r in train_rows(tmp_path)] == ["1", "2", "3"]


@pytest.mark.slow
def test_the_default_distributed_optimizer_resumes_to_the_same_weights(tmp_path, tiny_sft_model):
    """gpt_dpo.yaml's distributed_fused_adam, stopped after one step and resumed, equals an uninterrupted run."""
    import torch

    from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors

    default_optimizer = [o for o in FAST_DPO if not o.startswith("model.optim.name=")]
    dpo_main(dpo_config(tmp_path / "clean", tiny_sft_model, *default_optimizer))
    stop = "exp_manager.max_time_per_run=00:00:00:00"
    dpo_main(dpo_config(tmp_path / "resumed", tiny_sft_model, *default_optimizer, stop))
    dpo_main(dpo_config(tmp_path / "resumed", tiny_sft_model, *default_optimizer))
    assert [r["step"] for r in train_rows(tmp_path / "resumed")] == ["1", "2", "3"]
    weights = []
    for run in ("clean", "resumed"):
        with open_nemo(tmp_path / run / "checkpoints" / "megatron_gpt_dpo.nemo") as unpacked:
            weights.append(read_torch_dist_tensors(unpacked / "model_weights"))
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
