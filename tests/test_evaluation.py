"""Exact-match evaluation mechanics, with a tiny random model forced to end every answer at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nemo_aligner.data import embedded
from nemo_aligner.evaluation import exact_match_accuracy, response_text
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.tokenizers import ByteLevelTokenizer
from tests.conftest import perturb_, tiny_model_cfg

SPECIAL_TOKENS = ["<extra_id_0>", "<extra_id_1>", "<extra_id_2>"]
DATA_CFG = {
    "chat": True,
    "chat_prompt_tokens": embedded.CHAT_PROMPT_TOKENS,
    "validation_ds": {"max_seq_length": 128, "add_eos": False},
}


@pytest.fixture(scope="module")
def end_token_model() -> MegatronGPTModel:
    """A random model whose logits always put the end-of-turn token ``<extra_id_1>`` first."""
    cfg = tiny_model_cfg(
        encoder_seq_length=128,
        max_position_embeddings=128,
        tokenizer={"library": "byte-level", "special_tokens": SPECIAL_TOKENS},
    )
    model = MegatronGPTModel(cfg).eval()
    perturb_(model)
    end_id = model.tokenizer.special_token_ids["<extra_id_1>"]

    def force_end(module, inputs, output):
        logits = output[0] if isinstance(output, tuple) else output
        logits[..., end_id] = logits.abs().amax() + 100.0
        return output

    model.model.output_layer.register_forward_hook(force_end)
    return model


def write_chat(path: Path, samples: list[tuple[str, str, str | None]]) -> str:
    """A chat jsonl of (prompt, answer, task or None) one-turn conversations."""
    with path.open("w") as f:
        for prompt, answer, task in samples:
            line = {
                "system": "",
                "mask": "User",
                "conversations": [{"from": "User", "value": prompt}, {"from": "Assistant", "value": answer}],
            }
            if task is not None:
                line["task"] = task
            f.write(json.dumps(line) + "\n")
    return str(path)


def test_model_that_always_ends_scores_zero_on_the_held_out_set(end_token_model):
    test_file = str(embedded.EMBEDDED_DIR / "chat_test.jsonl")
    result = exact_match_accuracy(end_token_model, test_file, DATA_CFG, max_samples=21, batch_size=8)

    assert result["accuracy"] == 0.0 and result["num_samples"] == 21
    assert set(result["per_task"]) <= set(embedded.TASKS)
    assert sum(task["num_samples"] for task in result["per_task"].values()) == 21
    assert all(task["accuracy"] == 0.0 for task in result["per_task"].values())


def test_empty_answers_match_an_immediate_end_of_turn(end_token_model, tmp_path):
    # The ground truth "" renders as "\n<extra_id_1>" and the model answers "<extra_id_1>": both strip to "".
    samples = [("say nothing", "", "empty"), ("add 1 and 2", "3", "add"), ("be quiet", "", None)]
    path = write_chat(tmp_path / "data.jsonl", samples)
    result = exact_match_accuracy(end_token_model, path, DATA_CFG, batch_size=2)

    assert result["num_samples"] == 3 and result["accuracy"] == pytest.approx(2 / 3)
    assert result["per_task"] == {
        "add": {"accuracy": 0.0, "num_samples": 1},
        "empty": {"accuracy": 1.0, "num_samples": 1},
        "unknown": {"accuracy": 1.0, "num_samples": 1},
    }
    with_samples = exact_match_accuracy(end_token_model, path, DATA_CFG, per_sample=True, batch_size=2)
    assert with_samples["correct"] == [True, False, True]  # file order, for paired tests between models
    assert {k: v for k, v in with_samples.items() if k != "correct"} == result


def test_exact_match_and_response_text_strip_the_end_of_turn():
    assert embedded.exact_match("19\n<extra_id_1>", "19")
    assert not embedded.exact_match("19\n<extra_id_1>", "1")
    tokenizer = ByteLevelTokenizer(SPECIAL_TOKENS)
    chat_answer = tokenizer.text_to_ids(embedded.format_response("1 2 9"))
    assert response_text(chat_answer, tokenizer, ["<extra_id_1>"]) == "1 2 9"
    plain_answer = tokenizer.text_to_ids("19") + [tokenizer.eos_id]
    assert response_text(plain_answer, tokenizer, ["<extra_id_1>"]) == "19"


def test_rollout_judge_quality_by_hand():
    from nemo_aligner.evaluation import rollout_judge_quality

    records = {
        # add 1 and 2 = 3: "3" is right (scores 5, 4 -> mean 4.5), "4" wrong (5 -> 5), "9" wrong (1, None -> 1)
        0: {"prompt_text": "add 1 and 2", "response_texts": ["3", "4", "9"], "scores": [[5, 4], [5], [1, None]]},
        # reverse: ab = ba: "ba" right (mean 5), "ab" wrong (no valid score: left out)
        1: {"prompt_text": "reverse: ab", "response_texts": ["ba", "ab"], "scores": [[5], [None]]},
    }
    quality = rollout_judge_quality(records, high=5)
    # valid judgements: (5, right) agree, (4, right) no, (5, wrong) no, (1, wrong) agree, (5, right) agree -> 3 / 5
    assert quality["agreement"] == 3 / 5
    # correct means [4.5, 5], wrong means [5, 1]: 4.5>5 no, 4.5>1 yes, 5=5 half, 5>1 yes -> 2.5 / 4
    assert quality["auc"] == 2.5 / 4 and quality["correct_responses"] == 2 and quality["wrong_responses"] == 2
