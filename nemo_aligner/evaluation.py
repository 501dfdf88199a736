"""Held-out exact-match accuracy of a GPT model on an SFT or chat jsonl file (greedy, KV-cached generation).

The prompts are rendered exactly as in training: the file is read with
:func:`~nemo_aligner.data.nlp.builders.build_sft_dataset` and each sample's generation prompt and ground-truth
response come from ``SFTDataset.prompt_and_answer(i)``, the same split SPIN's rollouts use. The model answers
greedily until an end string (``<extra_id_1>`` by default) or ``max_new_tokens``; the response and the ground truth
are decoded, their end-of-turn (a trailing end string and the EOS token) removed, and compared with the embedded
data's :func:`~nemo_aligner.data.embedded.exact_match` (equal after stripping whitespace).

    initialize_distributed()  # megatron-core's parallel state, one process (a run's launcher sets it up)
    model = MegatronGPTModel.restore_from("sft.nemo")
    exact_match_accuracy(model, "chat_test.jsonl", cfg.model.data)
    # {"accuracy": 0.46, "num_samples": 300, "per_task": {"add": {"accuracy": 0.2, "num_samples": 43}, ...}}
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from nemo_aligner.data.embedded import exact_match
from nemo_aligner.data.nlp.builders import build_sft_dataset
from nemo_aligner.data.nlp.jsonl import read_jsonl
from nemo_aligner.judges.parsing import judge_reward_regex, meta_judge_reward_regex, parse_score, parse_verdict
from nemo_aligner.tokenizers import Tokenizer

if TYPE_CHECKING:
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel

DEFAULT_END_STRINGS = ("<extra_id_1>",)
"""Where a chat response ends: the next turn's marker of the ``<extra_id_*>`` template."""

UNKNOWN_TASK = "unknown"
"""The ``per_task`` key of samples whose jsonl line has no ``task``."""


def greedy_sampling_params(end_strings: Sequence[str]) -> dict[str, Any]:
    """NeMo ``sampling_params`` for greedy decoding that stops at ``end_strings`` (or EOS)."""
    return {
        "use_greedy": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "end_strings": list(end_strings),
        "add_BOS": False,
        "all_probs": False,
        "compute_logprob": False,
    }


def response_text(ids: Sequence[int], tokenizer: Tokenizer, end_strings: Sequence[str]) -> str:
    """Decoded response without its end-of-turn: a trailing EOS id, then one trailing end string, then whitespace.

    The chat ground truth ``"19\\n<extra_id_1>"`` and a generation stopped at ``<extra_id_1>`` both become ``"19"``;
    a plain-format answer ending with the EOS id loses that id (it may not decode to whitespace).
    """
    ids = list(ids)
    if ids and tokenizer.eos_id is not None and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    text = tokenizer.ids_to_text(ids).rstrip()
    for end in end_strings:
        if text.endswith(end):
            text = text[: -len(end)]
            break
    return text.strip()


def _split_config(data_cfg: Mapping[str, Any], file_path: str, max_seq_length: int) -> dict[str, Any]:
    """The validation split's settings (prompt template, label key, ...) pointed at ``file_path``."""
    split = data_cfg.get("validation_ds") or data_cfg.get("train_ds") or {}
    if isinstance(split, DictConfig):
        split = OmegaConf.to_container(split, resolve=True)
    split = {**split, "file_path": str(file_path)}
    split["max_seq_length"] = min(int(split.get("max_seq_length") or max_seq_length), max_seq_length)
    return split


def greedy_predictions(
    model: MegatronGPTModel,
    file_path: str,
    data_cfg: Mapping[str, Any],
    max_samples: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 24,
    end_strings: Sequence[str] = DEFAULT_END_STRINGS,
) -> list[tuple[dict[str, Any], str, str]]:
    """``(jsonl record, greedy prediction, ground truth)`` for the first ``max_samples`` samples of an SFT/chat jsonl.

    ``data_cfg`` is the ``model.data`` node of the training config (``chat``, ``chat_prompt_tokens`` and the
    ``validation_ds`` split's template keys), so prompts render as in training. Prompts are generated in batches of
    ``batch_size`` grouped by length. Single process (or every tensor-parallel rank with the same inputs).
    """
    tokenizer = model.tokenizer
    split_cfg = _split_config(data_cfg, file_path, model.encoder_seq_length)
    dataset = build_sft_dataset(data_cfg, split_cfg, tokenizer, seed=model.seed)
    records = [record.data for record in read_jsonl(file_path)]
    count = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    sampling = greedy_sampling_params(end_strings)
    length = {"max_length": max_new_tokens, "min_length": 0}
    pairs = [dataset.prompt_and_answer(i) for i in range(count)]
    # Batches of similar prompt lengths: the KV-cached decoder steps one token at a time past the shortest prompt.
    order = sorted(range(count), key=lambda i: len(pairs[i][0]))
    results: list[tuple[dict[str, Any], str, str] | None] = [None] * count
    for start in range(0, count, batch_size):
        indices = order[start : start + batch_size]
        output = model.generate([list(pairs[i][0]) for i in indices], sampling, length)
        for i, response in zip(indices, output.response_ids):
            prediction = response_text(response, tokenizer, end_strings)
            truth = response_text(pairs[i][1], tokenizer, end_strings)
            results[i] = (records[i], prediction, truth)
    return results


def exact_match_accuracy(model: MegatronGPTModel, file_path: str, data_cfg: Mapping[str, Any], **kwargs) -> dict:
    """Greedy exact-match accuracy on the first ``max_samples`` prompts (all by default) of an SFT/chat jsonl.

    Arguments as :func:`greedy_predictions`. Returns ``{"accuracy", "num_samples", "per_task": {task: {"accuracy",
    "num_samples"}}}``, the task taken from each jsonl line's ``task`` key (``"unknown"`` when absent).
    """
    correct: dict[str, list[bool]] = defaultdict(list)
    for record, prediction, truth in greedy_predictions(model, file_path, data_cfg, **kwargs):
        correct[record.get("task", UNKNOWN_TASK)].append(exact_match(prediction, truth))
    count = sum(len(values) for values in correct.values())
    hits = sum(sum(values) for values in correct.values())
    return {
        "accuracy": hits / count if count else 0.0,
        "num_samples": count,
        "per_task": {
            task: {"accuracy": sum(values) / len(values), "num_samples": len(values)}
            for task, values in sorted(correct.items())
        },
    }


def judge_accuracy(
    model: MegatronGPTModel,
    file_path: str,
    data_cfg: Mapping[str, Any],
    spin_cfg: Mapping[str, Any],
    **kwargs,
) -> dict[str, Any]:
    """How well a model judges: greedy judgements on a chat file of judge and meta-judge conversations (the
    embedded ``chat_judge_validation.jsonl``: lines whose ``id`` ends in ``-judge`` or ``-meta``), parsed with the
    ``model.spin`` regexes and score range exactly as Self-Rewarding parses them, against the parsed ground truth.

    Returns ``judge_parsed`` (share of judgements with a valid score), ``judge_exact`` (score equals the truth's),
    ``judge_agreement`` (the judgement gives the top score exactly when the truth does: "is the answer correct"),
    ``meta_parsed`` and ``meta_accuracy`` (the verdict names the right judgement), each over all lines of its role,
    an unparseable output counting as wrong. Other arguments as :func:`greedy_predictions`.
    """
    low, high = float(spin_cfg["judge_score_low"]), float(spin_cfg["judge_score_high"])
    score_pattern = judge_reward_regex(spin_cfg["judge_reward_regex"])
    verdict_pattern = meta_judge_reward_regex(spin_cfg["meta_judge_reward_regex"])
    judge: list[tuple[float | None, float | None]] = []
    meta: list[tuple[str | None, str | None]] = []
    for record, prediction, truth in greedy_predictions(model, file_path, data_cfg, **kwargs):
        if str(record.get("id", "")).endswith("-meta"):
            meta.append((parse_verdict(prediction, verdict_pattern), parse_verdict(truth, verdict_pattern)))
        else:
            judge.append(
                (parse_score(prediction, score_pattern, low, high), parse_score(truth, score_pattern, low, high))
            )

    def share(hits: int, total: int) -> float:
        return hits / total if total else 0.0

    return {
        "judge_samples": len(judge),
        "judge_parsed": share(sum(p is not None for p, _ in judge), len(judge)),
        "judge_exact": share(sum(p is not None and p == t for p, t in judge), len(judge)),
        "judge_agreement": share(sum(p is not None and (p == high) == (t == high) for p, t in judge), len(judge)),
        "meta_samples": len(meta),
        "meta_parsed": share(sum(p is not None for p, _ in meta), len(meta)),
        "meta_accuracy": share(sum(p is not None and p == t for p, t in meta), len(meta)),
    }


def rollout_judge_quality(records: Mapping[int, Mapping[str, Any]], high: float) -> dict[str, float]:
    """How well a Self-Rewarding run's judge scored its own policy's responses, on the embedded tasks.

    ``records`` are a persisted rollout's judge records (``self_rewarding_rollouts/iteration_<t>.pt``); each
    response is checked against the answer recomputed from its prompt (:func:`~nemo_aligner.data.embedded.answer_for`).
    ``agreement``: share of valid judgements where "score == ``high``" matches the exact-answer check. ``auc``: the
    probability that a correct response's mean score beats a wrong one's (ties count half; 0.5 = no signal), which is
    what pair selection relies on. Also the numbers of correct and wrong responses with at least one valid score.
    """
    from nemo_aligner.data.embedded import answer_for, task_of

    agree = total = 0
    correct_means, wrong_means = [], []
    for record in records.values():
        answer = answer_for(task_of(record["prompt_text"]), record["prompt_text"])
        for text, scores in zip(record["response_texts"], record["scores"]):
            valid = [s for s in scores if s is not None]
            is_correct = exact_match(text, answer)
            agree += sum((s == high) == is_correct for s in valid)
            total += len(valid)
            if valid:
                (correct_means if is_correct else wrong_means).append(sum(valid) / len(valid))
    pairs = len(correct_means) * len(wrong_means)
    wins = sum((a > b) + 0.5 * (a == b) for a in correct_means for b in wrong_means)
    return {
        "agreement": agree / total if total else 0.0,
        "auc": wins / pairs if pairs else 0.5,
        "correct_responses": float(len(correct_means)),
        "wrong_responses": float(len(wrong_means)),
    }
