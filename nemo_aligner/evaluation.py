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

During training, :class:`GenerationEvaluator` (``trainer.<algorithm>.evaluation``) scores the same way on the first
``num_prompts`` held-out prompts at every validation and before the first step, sharded over data-parallel ranks;
the loop logs its metrics as ``val/<metric>`` and :class:`EvaluationReport` keeps them in ``evaluation.json``.
"""

from __future__ import annotations

import importlib
import json
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    pairs = [dataset.prompt_and_answer(i) for i in range(count)]
    responses = generate_responses(
        model, [p for p, _ in pairs], greedy_sampling_params(end_strings), max_new_tokens, batch_size
    )
    return [
        (
            records[i],
            response_text(response, tokenizer, end_strings),
            response_text(pairs[i][1], tokenizer, end_strings),
        )
        for i, (response, _) in enumerate(responses)
    ]


def generate_responses(
    model: MegatronGPTModel,
    prompts: Sequence[Sequence[int]],
    sampling_params: Mapping[str, Any],
    max_new_tokens: int,
    batch_size: int,
    seeds: Sequence[int] | None = None,
) -> list[tuple[list[int], bool]]:
    """``(response ids, ended)`` per prompt, in the order given, from ``model.generate`` (the rollouts' batched,
    KV-cached generation) in batches of ``batch_size`` prompts of similar lengths (the decoder steps one token at
    a time past a batch's shortest prompt). ``seeds`` (one per prompt) key sampling; greedy needs none."""
    length = {"max_length": max_new_tokens, "min_length": 0}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[tuple[list[int], bool] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        chunk_seeds = None if seeds is None else [seeds[i] for i in chunk]
        output = model.generate([list(prompts[i]) for i in chunk], sampling_params, length, chunk_seeds)
        for i, response, ended in zip(chunk, output.response_ids, output.ended):
            results[i] = ([int(t) for t in response], bool(ended))
    return results


def exact_match_accuracy(
    model: MegatronGPTModel, file_path: str, data_cfg: Mapping[str, Any], per_sample: bool = False, **kwargs
) -> dict:
    """Greedy exact-match accuracy on the first ``max_samples`` prompts (all by default) of an SFT/chat jsonl.

    Arguments as :func:`greedy_predictions`. Returns ``{"accuracy", "num_samples", "per_task": {task: {"accuracy",
    "num_samples"}}}``, the task taken from each jsonl line's ``task`` key (``"unknown"`` when absent); with
    ``per_sample`` also ``"correct"``: one bool per sample in file order (for paired tests between models).
    """
    samples = [
        (record.get("task", UNKNOWN_TASK), exact_match(prediction, truth))
        for record, prediction, truth in greedy_predictions(model, file_path, data_cfg, **kwargs)
    ]
    correct: dict[str, list[bool]] = defaultdict(list)
    for task, hit in samples:
        correct[task].append(hit)
    hits = sum(hit for _, hit in samples)
    result = {
        "accuracy": hits / len(samples) if samples else 0.0,
        "num_samples": len(samples),
        "per_task": {
            task: {"accuracy": sum(values) / len(values), "num_samples": len(values)}
            for task, values in sorted(correct.items())
        },
    }
    if per_sample:
        result["correct"] = [hit for _, hit in samples]
    return result


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


# ---------------------------------------------------------------------------------------------- during training
METRICS = ("exact_match",)
"""The ``trainer.<algorithm>.evaluation.metric`` values: how a response is compared with the reference answer."""

BUILTIN_NORMALIZERS: dict[str, Callable[[str], str]] = {
    "lower": lambda text: " ".join(text.lower().split()),
    "whitespace": lambda text: " ".join(text.split()),
}
"""``evaluation.normalizer`` names besides ``module:function``: applied to both sides before they are compared."""


class PromptSource(Protocol):
    """Held-out prompts with reference answers: an ``SFTDataset`` or :class:`PreferencePrompts`."""

    def __len__(self) -> int: ...

    def prompt_and_answer(self, index: int) -> tuple[Sequence[int], Sequence[int]]: ...


class PreferencePrompts:
    """A DPO dataset's prompts, the chosen response as the reference answer."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def prompt_and_answer(self, index: int) -> tuple[list[int], list[int]]:
        pair = self.dataset.pairs[index]
        ids = pair.chosen_ids.tolist()
        return ids[: pair.prompt_length], ids[pair.prompt_length :]


def load_normalizer(name: str | None) -> Callable[[str], str] | None:
    """``evaluation.normalizer``: None, a built-in name (``lower``, ``whitespace``) or ``package.module:function``
    (a ``str -> str`` of the user's, applied to the response and the reference answer before they are compared).
    ValueError naming the key when it cannot be found."""
    if not name:
        return None
    if name in BUILTIN_NORMALIZERS:
        return BUILTIN_NORMALIZERS[name]
    module_name, _, attribute = str(name).partition(":")
    if not attribute:
        raise ValueError(f"{name!r} is neither {' nor '.join(BUILTIN_NORMALIZERS)} nor 'package.module:function'")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import {name!r}: {err}") from None
    if not callable(function):
        raise ValueError(f"{name!r} is not callable")
    return function


@dataclass(frozen=True)
class EvaluationConfig:
    """``trainer.<algorithm>.evaluation`` (the YAMLs hold every default)."""

    num_prompts: int
    max_length: int
    batch_size: int
    metric: str
    normalizer: str | None
    sampling: dict[str, Any]

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> EvaluationConfig | None:
        """None when the node is absent or ``enabled`` is false."""
        if not node or not node.get("enabled", False):
            return None
        plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
        return cls(
            num_prompts=int(plain["num_prompts"]),
            max_length=int(plain["max_length"]),
            batch_size=int(plain.get("batch_size") or plain["num_prompts"]),
            metric=str(plain.get("metric") or "exact_match"),
            normalizer=plain.get("normalizer"),
            sampling=evaluation_sampling_params(plain.get("sampling")),
        )


def evaluation_sampling_params(sampling: Mapping[str, Any] | None) -> dict[str, Any]:
    """``evaluation.sampling`` as complete NeMo ``sampling_params``: keys left out are greedy decoding's."""
    sampling = dict(sampling or {})
    return {**greedy_sampling_params(sampling.get("end_strings") or DEFAULT_END_STRINGS), **sampling}


Judge = Callable[[Mapping[int, Sequence[int]], Mapping[int, Sequence[int]]], Mapping[int, "float | None"]]
"""``(prompts, responses) -> score`` per sample index (None: no valid judgement): Self-Rewarding's own judge."""


class GenerationEvaluator:
    """Held-out generation metrics of a model during training (``trainer.<algorithm>.evaluation``).

    The model answers the first ``num_prompts`` prompts of ``prompts`` (each data-parallel rank a strided share,
    the tensor- and pipeline-parallel ranks of a replica together, with the batched generation of the rollouts);
    the results are gathered, so every rank returns the same metrics:

    * ``exact_match``: share of responses equal to the reference answer (:func:`response_text` on both, then the
      optional normaliser, then the embedded data's :func:`~nemo_aligner.data.embedded.exact_match`);
    * ``response_length``: mean number of generated tokens (an end token included);
    * ``unfinished_fraction``: share of responses that hit ``max_length`` without an end string;
    * ``judge_score`` (with a ``judge``: Self-Rewarding's) mean valid score of the responses, and
      ``judge_unparseable_fraction``.

    Sampling (``use_greedy: false``) draws each prompt's response with the same key at every evaluation.
    """

    def __init__(self, cfg: EvaluationConfig, prompts: PromptSource, tokenizer: Tokenizer, seed: int):
        self.cfg = cfg
        self.prompts = prompts
        self.tokenizer = tokenizer
        self.seed = seed
        self.normalize = load_normalizer(cfg.normalizer)
        self.end_strings = tuple(cfg.sampling.get("end_strings") or ())
        self.num_prompts = min(cfg.num_prompts, len(prompts))

    def answers_match(self, response_ids: Sequence[int], answer_ids: Sequence[int]) -> bool:
        prediction = response_text(response_ids, self.tokenizer, self.end_strings)
        truth = response_text(answer_ids, self.tokenizer, self.end_strings)
        if self.normalize is not None:
            prediction, truth = self.normalize(prediction), self.normalize(truth)
        return exact_match(prediction, truth)

    def evaluate(self, model, judge: Judge | None = None) -> dict[str, float]:
        from megatron.core import parallel_state

        from nemo_aligner.utils.distributed import union_over_data_parallel
        from nemo_aligner.utils.seeds import sample_seed

        dp_rank = parallel_state.get_data_parallel_rank()
        dp_size = parallel_state.get_data_parallel_world_size()
        mine = list(range(self.num_prompts))[dp_rank::dp_size]
        pairs = {i: self.prompts.prompt_and_answer(i) for i in mine}
        prompts = [list(pairs[i][0]) for i in mine]
        seeds = None if self.cfg.sampling.get("use_greedy", True) else [sample_seed(self.seed, 0, i) for i in mine]
        responses = generate_responses(
            model, prompts, self.cfg.sampling, self.cfg.max_length, self.cfg.batch_size, seeds
        )
        local = {
            i: {"correct": self.answers_match(ids, pairs[i][1]), "length": len(ids), "ended": ended}
            for i, (ids, ended) in zip(mine, responses)
        }
        if judge is not None:
            scores = judge(dict(zip(mine, prompts)), {i: ids for i, (ids, _) in zip(mine, responses)})
            for i in mine:
                local[i]["score"] = scores.get(i)
        results = list(union_over_data_parallel(local).values())
        count = max(len(results), 1)
        metrics = {
            "exact_match": sum(r["correct"] for r in results) / count,
            "response_length": sum(r["length"] for r in results) / count,
            "unfinished_fraction": sum(not r["ended"] for r in results) / count,
        }
        if judge is not None:
            valid = [r["score"] for r in results if r.get("score") is not None]
            metrics["judge_score"] = sum(valid) / len(valid) if valid else float("nan")
            metrics["judge_unparseable_fraction"] = 1.0 - len(valid) / count
        return metrics


def build_evaluator(node: Mapping[str, Any] | None, prompts: PromptSource, tokenizer, seed: int):
    """The run's :class:`GenerationEvaluator`, or None when ``evaluation.enabled`` is false or absent."""
    cfg = EvaluationConfig.from_config(node)
    return None if cfg is None else GenerationEvaluator(cfg, prompts, tokenizer, seed)


# ---------------------------------------------------------------------------------------------- the report
REPORT_FILE = "evaluation.json"
TABLE_METRICS = ("exact_match", "response_length", "unfinished_fraction", "judge_score")


class EvaluationReport:
    """The run's evaluations in order: before the first step, at each validation and iteration end, and the last
    one marked as the end. Kept in ``<log dir>/evaluation.json`` (rewritten at each evaluation by global rank 0,
    so it survives a crash; a resumed run keeps the entries up to its resume step)."""

    def __init__(self, path: Path | None, num_prompts: int = 0):
        self.path = None if path is None else Path(path)
        self.num_prompts = num_prompts
        self.entries: list[dict[str, Any]] = []

    def resume(self, step: int) -> None:
        """A fresh run (step 0) starts an empty report; a resumed one keeps the stored entries up to ``step``."""
        self.entries = []
        if step > 0 and self.path is not None and self.path.is_file():
            stored = json.loads(self.path.read_text(encoding="utf-8")).get("evaluations", [])
            self.entries = [e for e in stored if int(e["step"]) <= step]
            for entry in self.entries:
                entry.pop("end", None)

    def latest(self, step: int) -> dict[str, float] | None:
        """The metrics of an evaluation already made at ``step`` (None if none)."""
        if self.entries and self.entries[-1]["step"] == step:
            return self.entries[-1]["metrics"]
        return None

    def record(self, step: int, label: str, metrics: Mapping[str, float], **where: Any) -> None:
        """Add an evaluation; one already at ``step`` takes the more telling ``label`` (an iteration's end)."""
        if self.entries and self.entries[-1]["step"] == step:
            if label.startswith("iteration"):
                self.entries[-1]["label"] = label
                self.write()
            return
        self.entries.append({"label": label, "step": int(step), **where, "metrics": dict(metrics)})
        self.write()

    def finish(self) -> None:
        if self.entries:
            self.entries[-1]["end"] = True
            self.write()

    def as_dict(self) -> dict[str, Any]:
        return {"num_prompts": self.num_prompts, "evaluations": self.entries}

    def write(self) -> None:
        from nemo_aligner.utils.distributed import is_global_rank_zero

        if self.path is None or not is_global_rank_zero():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.as_dict(), indent=1), encoding="utf-8")
        temporary.replace(self.path)

    def table(self) -> str:
        """The report as a text table (what the run's summary prints)."""
        return format_table(self.as_dict())


def format_table(report: Mapping[str, Any]) -> str:
    """An ``evaluation.json`` as a text table: one row per evaluation (when, step, the metrics)."""
    entries = report.get("evaluations", [])
    names = [m for m in TABLE_METRICS if any(m in e["metrics"] for e in entries)]
    header = f"{'when':<22}{'step':>6}" + "".join(f"{name:>22}" for name in names)
    lines = [f"held-out evaluation ({report.get('num_prompts', '?')} prompts)", header]
    for entry in entries:
        when = entry["label"] + (" (end)" if entry.get("end") else "")
        cells = "".join(f"{entry['metrics'].get(name, float('nan')):>22.4f}" for name in names)
        lines.append(f"{when:<22}{entry['step']:>6}{cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m nemo_aligner.evaluation RUN_DIR``: print the run's ``evaluation.json`` as a table."""
    import argparse

    parser = argparse.ArgumentParser(description="Print a run's held-out evaluation table (evaluation.json).")
    parser.add_argument("run_dir", type=Path, help="the run's results directory, e.g. results/megatron_gpt_spin")
    args = parser.parse_args(argv)
    path = args.run_dir / REPORT_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: not found; was trainer.<algorithm>.evaluation.enabled true for this run?")
    print(format_table(json.loads(path.read_text(encoding="utf-8"))))


if __name__ == "__main__":
    main()
