"""The Self-Rewarding rollout with a scripted model: exact pairs, masks, meta-judge pairs and metrics by hand."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import pytest

from nemo_aligner.data.embedded import (
    CHAT_PROMPT_TOKENS,
    JUDGE_PROMPT_TEMPLATE,
    META_JUDGE_PROMPT_TEMPLATE,
    format_prompt,
    render_judge_prompt,
)
from nemo_aligner.judges.rollout import (
    BAD,
    META,
    RESPONSE,
    JudgedRollout,
    batch_metrics,
    build_pairs,
    judge_health,
)
from nemo_aligner.tokenizers import build_tokenizer

END = "\n<extra_id_1>"


def whole_input(template: str) -> str:
    """A configured judge prompt is the model's whole input: the user turn of the chat template written out."""
    return f"<extra_id_0>System\n\n<extra_id_1>User\n{template}\n<extra_id_1>Assistant\n"


SPIN_CFG = {
    "num_responses_to_gen": 3,
    "num_evals_to_average": 2,
    "use_meta_judge": True,
    "meta_judge_pcnt": 0.5,
    "meta_max_relative_pcnt": 1.0,
    "judge_score_low": 0,
    "judge_score_high": 5,
    "llm_judge_prompt": whole_input(JUDGE_PROMPT_TEMPLATE),
    "llm_meta_judge_prompt": whole_input(META_JUDGE_PROMPT_TEMPLATE),
    "normalise_prompt": True,
    "sampling_params": {"use_greedy": False, "temperature": 1.0},
    "length_params": {"max_length": 16, "min_length": 1},
    "judge_length_params": {"max_length": 32, "min_length": 1},
}
# question -> its N responses; (question, response) -> its k judgements.
RESPONSES = {
    "add 1 and 2": ["3", "4", "33"],
    "add 2 and 2": ["4", "4", "4"],
    "add 3 and 3": ["6", "7", "8"],
    "add 0 and 1": ["1", "10", "1"],
}
JUDGEMENTS = {
    ("add 1 and 2", "3"): ["Correct. Score: 5", "Score: 5"],
    ("add 1 and 2", "4"): ["Close. Score: 2", "Way off. Score: 0"],
    ("add 1 and 2", "33"): ["Score: 0", "no idea"],
    **{("add 2 and 2", "4"): ["Score: 5", "Score: 5"]},
    **{("add 3 and 3", r): ["hmm", "Score: 9"] for r in ("6", "7", "8")},  # 9 is out of range
    ("add 0 and 1", "1"): ["Score: 5", "Score: 5"],
    ("add 0 and 1", "10"): ["Score: 1", "Score: 1"],
}


@dataclass
class Output:
    response_ids: list[list[int]]
    ended: list[bool]


class ScriptedModel:
    """``generate`` answers from the scripts above; the meta-judge prefers the judgement that says ``Score: 2``."""

    def __init__(self, never_parseable: bool = False):
        self.tokenizer = build_tokenizer(
            {"library": "byte-level", "special_tokens": list(CHAT_PROMPT_TOKENS.values())[:3]}
        )
        self.calls: dict[str, int] = defaultdict(int)
        self.seeds: list[int] = []
        self.never_parseable = never_parseable

    def generate(self, prompts, sampling_params, length_params, seeds):
        self.seeds += list(seeds)
        texts = []
        for ids in prompts:
            prompt = self.tokenizer.ids_to_text(ids)
            n = self.calls[prompt]
            self.calls[prompt] += 1
            user = prompt.split("<extra_id_1>User\n", 1)[1].split("\n<extra_id_1>Assistant", 1)[0]
            if user.startswith("Rate the answer."):
                question, answer = user.split("\nQuestion: ", 1)[1].split("\nAnswer: ", 1)
                texts.append("I cannot tell." if self.never_parseable else JUDGEMENTS[(question, answer)][n % 2])
            elif user.startswith("Which judgement"):
                a = user.split("\nJudgement A: ", 1)[1].split("\nJudgement B: ", 1)[0]
                texts.append("Winner: Judgement " + ("A" if "Score: 2" in a else "B"))
            else:
                question = user
                texts.append(RESPONSES[question][n])
        return Output([self.tokenizer.text_to_ids(t + END) for t in texts], [True] * len(texts))


def prompt_ids(tokenizer, question: str) -> list[int]:
    return tokenizer.text_to_ids(format_prompt(question))


def run(model: ScriptedModel, length_control: float = 0.0):
    rollout = JudgedRollout(model, SPIN_CFG, CHAT_PROMPT_TOKENS, context_length=256)
    prompts = {i: prompt_ids(model.tokenizer, q) for i, q in enumerate(RESPONSES)}
    records = rollout.judge(prompts, iteration=0, seed=1234, batch_size=6)
    slots = build_pairs(records, prompts, [[0, 1, 2, 3]], rollout.cfg, length_control, True, seed=1234)
    return rollout, prompts, records, slots


def ids(model, text: str) -> list[int]:
    return model.tokenizer.text_to_ids(text + END)


def test_scripted_judge_gives_the_pairs_masks_meta_pair_and_metrics_by_hand():
    model = ScriptedModel()
    rollout, prompts, records, slots = run(model)
    assert len(set(model.seeds)) == len(model.seeds)  # every response, judgement and verdict has its own key
    assert records[0]["scores"] == [[5.0, 5.0], [2.0, 0.0], [0.0, None]]
    assert records[2]["scores"] == [[None, None]] * 3
    # Prompt 0: chosen "3" (5), rejected "33" (0, one valid judgement); prompt 3: the first "1" vs "10".
    assert slots[0]["kind"] == RESPONSE and slots[0]["chosen"] == ids(model, "3")
    assert slots[0]["rejected"] == ids(model, "33")
    assert (slots[0]["chosen_reward"], slots[0]["rejected_reward"]) == (5.0, 0.0)
    assert slots[3]["kind"] == RESPONSE and slots[3]["chosen"] == ids(model, "1")
    assert slots[3]["rejected"] == ids(model, "10") and slots[3]["rejected_reward"] == 1.0
    # Prompt 2: no valid score -> bad. Prompt 1 (all equal, bad) is the slot the one meta pair replaces.
    assert slots[2]["kind"] == BAD and slots[2]["reason"] == "TOO_FEW_SCORES"
    meta = slots[1]
    assert meta["kind"] == META and meta["source"] == 0
    assert meta["prompt"] == rollout.user_turn(render_judge_prompt("add 1 and 2", "4"))
    assert meta["chosen"] == ids(model, "Close. Score: 2") and meta["rejected"] == ids(model, "Way off. Score: 0")
    assert meta["chosen_reward"] > 0 and meta["chosen_reward"] == pytest.approx(-meta["rejected_reward"])
    # The most disputed response ("4": scores 2 and 0) was compared in both orders.
    assert records[0]["meta"]["verdicts"] == [[0, 1, "A"], [1, 0, "B"]]

    lengths = len(ids(model, "3")) + len(ids(model, "1"))
    assert meta["replaced"] == BAD
    # Two of the four prompts were bad samples (1 and 2), even though the meta pair now fills prompt 1's slot.
    assert batch_metrics([slots[i] for i in range(4)]) == {
        "bad_samples_per_GBS": 0.5,
        "bad_ends_per_GBS": 0.0,
        "meta_pairs_per_GBS": 1.0,
        "chosen_lengths": lengths / 2,
        "reject_lengths": (len(ids(model, "33")) + len(ids(model, "10"))) / 2,
        "chosen_generated_rewards": 5.0,
        "rejected_generated_rewards": 0.5,
    }
    health = judge_health(records, rollout.cfg)
    assert health["judge_unparseable_fraction"] == pytest.approx(7 / 24)
    assert [health[f"judge_score_hist_{s}"] for s in range(6)] == pytest.approx([2 / 24, 2 / 24, 1 / 24, 0, 0, 12 / 24])
    assert health["judge_all_equal_rate"] == 0.25 and health["meta_candidates"] == 1.0


def test_length_control_prefers_the_shortest_chosen_and_longest_rejected():
    model = ScriptedModel()
    _, _, _, slots = run(model, length_control=0.45)
    # rho = 0.45 on prompt 0 (scores 5, 1, 0): chosen from s >= 2.75 ("3"), rejected from s <= 2.25: "33" is longest.
    assert slots[0]["chosen"] == ids(model, "3") and slots[0]["rejected"] == ids(model, "33")


def test_meta_judge_off_or_zero_share_gives_no_meta_pairs():
    model = ScriptedModel()
    rollout = JudgedRollout(model, {**SPIN_CFG, "meta_judge_pcnt": 0}, CHAT_PROMPT_TOKENS, context_length=256)
    prompts = {i: prompt_ids(model.tokenizer, q) for i, q in enumerate(RESPONSES)}
    records = rollout.judge(prompts, iteration=0, seed=1234, batch_size=64)
    slots = build_pairs(records, prompts, [[0, 1, 2, 3]], rollout.cfg, 0.0, True, seed=1234)
    assert [slots[i]["kind"] for i in range(4)] == [RESPONSE, BAD, BAD, RESPONSE]
    assert not any("Which judgement" in model.tokenizer.ids_to_text(list(k)) for k in [])  # no verdicts asked
    assert all("Which judgement" not in prompt for prompt in model.calls)


def test_a_judge_that_never_parses_masks_every_sample():
    model = ScriptedModel(never_parseable=True)
    rollout, _, records, slots = run(model)
    assert all(slot["kind"] == BAD for slot in slots.values())
    metrics = batch_metrics(list(slots.values()))
    assert metrics["bad_samples_per_GBS"] == 1.0 and metrics["meta_pairs_per_GBS"] == 0.0
    assert judge_health(records, rollout.cfg)["judge_unparseable_fraction"] == 1.0


def test_a_configured_judge_prompt_is_the_whole_input_and_the_built_in_one_a_user_turn():
    """NeMo-Aligner's convention: a ported prompt (chat markup included) is not wrapped a second time."""
    model = ScriptedModel()
    configured = JudgedRollout(model, SPIN_CFG, CHAT_PROMPT_TOKENS, context_length=256)
    built_in = JudgedRollout(
        model, {**SPIN_CFG, "llm_judge_prompt": None, "llm_meta_judge_prompt": None}, CHAT_PROMPT_TOKENS, 256
    )
    text = whole_input("Rate the answer.\nQuestion: q\nAnswer: a")
    assert configured.judge_input(text) == model.tokenizer.text_to_ids(text)
    assert configured.meta_input(text) == model.tokenizer.text_to_ids(text)
    assert (
        built_in.judge_input("Rate it")
        == built_in.meta_input("Rate it")
        == model.tokenizer.text_to_ids(whole_input("Rate it"))
    )
