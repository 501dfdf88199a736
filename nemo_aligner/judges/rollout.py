"""The Self-Rewarding / Meta-Rewarding rollout's judging (Yuan et al. 2024, arXiv 2401.10020; Wu et al. 2024,
arXiv 2407.19594): the model answers each prompt N times, judges each answer k times, optionally meta-judges its
most disputed judgements; the scores become training pairs (slots) for the iteration's global batches.

The model is anything with ``generate(prompts, sampling_params, length_params, seeds)`` and ``tokenizer``; the loop
(``nemo_aligner/algorithms/self_rewarding.py``) decides when to judge and persists the result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.pairs import BAD, BAD_END, META, RESPONSE
from nemo_aligner.judges import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_JUDGE_REWARD_REGEX,
    DEFAULT_META_JUDGE_PROMPT,
    DEFAULT_META_JUDGE_REWARD_REGEX,
    BadSample,
    Candidate,
    aggregate_scores,
    fit_judge_prompts,
    judge_prompt_template,
    judge_reward_regex,
    meta_judge_comparisons,
    meta_judge_prompt_template,
    meta_judge_reward_regex,
    most_disputed_response,
    normalise_prompt,
    normalise_response,
    parse_score,
    parse_verdict,
    rank_judgements,
    select_meta_judge_pairs,
    select_pair,
)
from nemo_aligner.judges.meta import ELO_BASE, ELO_SCALE
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.seeds import sample_seed
from nemo_aligner.utils.timers import PhaseTimers


def generation_seed(seed: int, iteration: int, sample_index: int, role: int, number: int) -> int:
    """RNG key of one generation: ``role`` 0 = response, 1 = judgement, 2 = meta verdict; ``number`` within it."""
    return (sample_seed(seed, iteration, sample_index) * 31 + role * 1_000_033 + number * 7_907) % (2**63 - 1)


@dataclass(frozen=True)
class JudgeConfig:
    """The ``model.spin`` settings of the rollout, parsed once."""

    num_responses: int
    num_evals: int
    use_meta_judge: bool
    meta_judge_pcnt: float
    meta_max_relative_pcnt: float
    score_low: float
    score_high: float
    normalise_prompt: bool
    sampling_params: dict
    length_params: dict
    judge_length_params: dict

    @classmethod
    def from_config(cls, spin: Mapping[str, Any]) -> JudgeConfig:
        plain = OmegaConf.to_container(spin, resolve=True) if isinstance(spin, DictConfig) else dict(spin)
        return cls(
            num_responses=int(plain.get("num_responses_to_gen", 4)),
            num_evals=int(plain.get("num_evals_to_average", 3)),
            use_meta_judge=bool(plain.get("use_meta_judge", False)),
            meta_judge_pcnt=float(plain.get("meta_judge_pcnt", -1)),
            meta_max_relative_pcnt=float(plain.get("meta_max_relative_pcnt", 0.4)),
            score_low=float(plain.get("judge_score_low", 0)),
            score_high=float(plain.get("judge_score_high", 5)),
            normalise_prompt=bool(plain.get("normalise_prompt", True)),
            sampling_params=plain["sampling_params"],
            length_params=plain["length_params"],
            judge_length_params=plain.get("judge_length_params") or plain["length_params"],
        )


class JudgedRollout:
    """Responses, judgements and meta verdicts of prompts (``judge``), then pairs for the batches (``build_pairs``).

    ``model`` needs ``generate(prompts, sampling_params, length_params, seeds)`` (a ``GenerationOutput``) and
    ``tokenizer``; ``context_length`` bounds judge prompts (minus the judgement's ``max_length``).
    """

    def __init__(
        self,
        model,
        spin_cfg: Mapping[str, Any],
        chat_prompt_tokens: Mapping[str, str],
        context_length: int,
        timers: PhaseTimers | None = None,
    ):
        self.model = model
        self.timers = timers or PhaseTimers()  # judging_s: judge and meta-judge generations and parsing
        self.tokenizer = model.tokenizer
        self.cfg = JudgeConfig.from_config(spin_cfg)
        get = spin_cfg.get
        self.judge_template = judge_prompt_template(get("llm_judge_prompt") or DEFAULT_JUDGE_PROMPT)
        self.meta_template = meta_judge_prompt_template(get("llm_meta_judge_prompt") or DEFAULT_META_JUDGE_PROMPT)
        self.score_regex = judge_reward_regex(get("judge_reward_regex") or DEFAULT_JUDGE_REWARD_REGEX)
        self.verdict_regex = meta_judge_reward_regex(get("meta_judge_reward_regex") or DEFAULT_META_JUDGE_REWARD_REGEX)
        self.tokens = ChatPromptTokens.from_config(chat_prompt_tokens)
        self.chat = ChatTemplate(self.tokenizer, self.tokens, max_seq_length=10**9)
        self.prompt_budget = context_length - int(self.cfg.judge_length_params.get("max_length", 0))

    # ------------------------------------------------------------------ text helpers
    def user_turn(self, text: str) -> list[int]:
        """``text`` as a user turn in the chat template, up to where the assistant's answer starts."""
        conversation = {
            "system": "",
            "conversations": [{"from": "User", "value": text}, {"from": "Assistant", "value": ""}],
        }
        return self.chat.prompt_and_answer(conversation)[0]

    def _text(self, ids: Sequence[int]) -> str:
        return normalise_response(self.tokenizer.ids_to_text(list(ids)), self.tokens)

    def _generate(self, prompts: list[list[int]], seeds: list[int], length_params: dict) -> tuple[list, list]:
        if not prompts:
            return [], []
        out = self.model.generate(prompts, self.cfg.sampling_params, length_params, seeds)
        return [[int(t) for t in r] for r in out.response_ids], [bool(e) for e in out.ended]

    # ------------------------------------------------------------------ per-prompt work
    def judge(self, items: Mapping[int, Sequence[int]], iteration: int, seed: int, batch_size: int) -> dict[int, dict]:
        """For each ``sample index -> prompt ids``: responses, judgements, scores and (meta-judge on) a judge pair."""
        cfg = self.cfg
        records: dict[int, dict] = {}
        indices = list(items)
        for start in range(0, len(indices), max(batch_size // cfg.num_responses, 1)):
            chunk = indices[start : start + max(batch_size // cfg.num_responses, 1)]
            prompts = [list(items[i]) for i in chunk for _ in range(cfg.num_responses)]
            seeds = [generation_seed(seed, iteration, i, 0, r) for i in chunk for r in range(cfg.num_responses)]
            responses, ended = self._generate(prompts, seeds, cfg.length_params)
            for n, i in enumerate(chunk):
                part = slice(n * cfg.num_responses, (n + 1) * cfg.num_responses)
                records[i] = {"responses": responses[part], "ended": ended[part]}
            with self.timers("judging"):
                self.judge_responses(chunk, items, records, iteration, seed)
                if cfg.use_meta_judge and cfg.meta_judge_pcnt > 0:
                    self._meta_judge(chunk, records, iteration, seed)
            kill_point("rollout")
        return records

    def judge_responses(self, chunk, items, records, iteration: int, seed: int) -> None:
        """Judge ``records[i]["responses"]`` (``num_responses`` per prompt) of the prompts ``chunk`` (``items[i]``
        their ids): ``prompt_text``, ``response_texts``, ``judge_prompts``, ``judgements`` and ``scores`` added."""
        cfg = self.cfg
        values = []
        for i in chunk:
            prompt_text = self.tokenizer.ids_to_text(list(items[i]))
            prompt_text = normalise_prompt(prompt_text, self.tokens) if cfg.normalise_prompt else prompt_text
            records[i]["prompt_text"] = prompt_text
            records[i]["response_texts"] = [self._text(r) for r in records[i]["responses"]]
            values += [{"prompt": prompt_text, "response": text} for text in records[i]["response_texts"]]
        fitted = fit_judge_prompts(
            self.judge_template,
            values,
            token_length=lambda text: len(self.user_turn(text)),
            max_length=self.prompt_budget,
        )
        jobs, prompts, seeds = [], [], []
        for n, text in enumerate(fitted.prompts):
            i, r = chunk[n // cfg.num_responses], n % cfg.num_responses
            records[i].setdefault("judge_prompts", []).append(None if text is None else self.user_turn(text))
            records[i].setdefault("judgements", []).append([[] for _ in range(cfg.num_evals)])
            records[i].setdefault("scores", []).append([None] * cfg.num_evals)
            if text is not None:
                for e in range(cfg.num_evals):
                    jobs.append((i, r, e))
                    prompts.append(records[i]["judge_prompts"][r])
                    seeds.append(generation_seed(seed, iteration, i, 1, r * cfg.num_evals + e))
        judgements, _ = self._generate(prompts, seeds, cfg.judge_length_params)
        for (i, r, e), ids in zip(jobs, judgements):
            records[i]["judgements"][r][e] = ids
            records[i]["scores"][r][e] = parse_score(self._text(ids), self.score_regex, cfg.score_low, cfg.score_high)

    def _meta_judge(self, chunk, records, iteration: int, seed: int) -> None:
        cfg = self.cfg
        jobs, prompts, seeds = [], [], []
        for i in chunk:
            record = records[i]
            record["meta"] = None
            disputed = most_disputed_response(record["scores"])
            if disputed is None:
                continue
            record["meta"] = {"response": disputed}
            texts = [self._text(j) for j in record["judgements"][disputed]]
            for n, (a, b) in enumerate(meta_judge_comparisons(cfg.num_evals)):
                text = self.meta_template.render(
                    prompt=record["prompt_text"],
                    response=record["response_texts"][disputed],
                    judgement_a=texts[a],
                    judgement_b=texts[b],
                )
                jobs.append((i, a, b))
                prompts.append(self.user_turn(text))
                seeds.append(generation_seed(seed, iteration, i, 2, n))
        verdict_ids, _ = self._generate(prompts, seeds, cfg.judge_length_params)
        verdicts: dict[int, list] = {}
        for (i, a, b), ids in zip(jobs, verdict_ids):
            verdicts.setdefault(i, []).append((a, b, parse_verdict(self._text(ids), self.verdict_regex)))
        for i, found in verdicts.items():
            meta = records[i]["meta"]
            meta["verdicts"] = [[a, b, v] for a, b, v in found]
            ranking = rank_judgements(cfg.num_evals, found)
            disputed = meta["response"]
            if ranking is None:
                records[i]["meta"] = None
                continue
            judgements = records[i]["judgements"][disputed]
            if judgements[ranking.chosen] == judgements[ranking.rejected]:
                records[i]["meta"] = None
                continue
            meta.update(
                chosen=ranking.chosen,
                rejected=ranking.rejected,
                chosen_strength=float((ranking.ratings[ranking.chosen] - ELO_BASE) / ELO_SCALE),
                rejected_strength=float((ranking.ratings[ranking.rejected] - ELO_BASE) / ELO_SCALE),
                score_class=records[i]["scores"][disputed][ranking.chosen],
            )


def build_pairs(
    records: Mapping[int, Mapping[str, Any]],
    prompts: Mapping[int, Sequence[int]],
    global_batches: Sequence[Sequence[int]],
    cfg: JudgeConfig,
    length_control: float,
    mask_unfinished: bool,
    seed: int,
) -> dict[int, dict]:
    """The training slot of every judged sample index: a response pair, a bad sample or bad end, or a meta pair.

    ``global_batches`` (sample indices of each global batch, in order) decide where meta-judge pairs go: per batch,
    ``select_meta_judge_pairs`` over the not yet used meta candidates (in sample-index order), which then replace
    the batch's bad samples first, then its last pairs.
    """
    slots: dict[int, dict] = {}
    for i in sorted(records):
        record = records[i]
        candidates = [
            Candidate(scores, len(ids), tuple(ids)) for scores, ids in zip(record["scores"], record["responses"])
        ]
        choice = select_pair(candidates, length_control)
        if isinstance(choice, BadSample):
            slots[i] = slot(prompts[i], [], [], 0.0, 0.0, BAD, reason=choice.reason.name)
            continue
        chosen, rejected = record["responses"][choice.chosen], record["responses"][choice.rejected]
        unfinished = not (record["ended"][choice.chosen] and record["ended"][choice.rejected])
        kind = BAD_END if unfinished and mask_unfinished else RESPONSE
        slots[i] = slot(prompts[i], chosen, rejected, choice.chosen_score, choice.rejected_score, kind)
        slots[i]["bad_end"] = unfinished
    if not (cfg.use_meta_judge and cfg.meta_judge_pcnt > 0):
        return slots
    pool = [i for i in sorted(records) if records[i].get("meta") and "chosen" in records[i]["meta"]]
    for b, batch in enumerate(global_batches):
        members = [i for i in batch if i in slots]
        classes = [records[i]["meta"]["score_class"] for i in pool]
        picked = select_meta_judge_pairs(
            classes,
            global_batch_size=len(batch),
            meta_judge_pcnt=cfg.meta_judge_pcnt,
            meta_max_relative_pcnt=cfg.meta_max_relative_pcnt,
            seed=sample_seed(seed, b, 0),
        )
        targets = [i for i in members if slots[i]["kind"] != RESPONSE] + [
            i for i in reversed(members) if slots[i]["kind"] == RESPONSE
        ]
        for target, source in zip(targets, [pool[p] for p in picked]):
            record, meta = records[source], records[source]["meta"]
            judgements = record["judgements"][meta["response"]]
            slots[target] = slot(
                record["judge_prompts"][meta["response"]],
                judgements[meta["chosen"]],
                judgements[meta["rejected"]],
                meta["chosen_strength"],
                meta["rejected_strength"],
                META,
                source=source,
                replaced=slots[target]["kind"],
            )
        used = {pool[p] for p in picked[: len(targets)]}
        pool = [i for i in pool if i not in used]
    return slots


def slot(prompt, chosen, rejected, chosen_reward: float, rejected_reward: float, kind: str, **extra) -> dict:
    return {
        "prompt": [int(t) for t in prompt],
        "chosen": [int(t) for t in chosen],
        "rejected": [int(t) for t in rejected],
        "chosen_reward": float(chosen_reward),
        "rejected_reward": float(rejected_reward),
        "kind": kind,
        "bad_end": False,
        **extra,
    }


def judge_health(records: Mapping[int, Mapping[str, Any]], cfg: JudgeConfig) -> dict[str, float]:
    """Iteration-level judge statistics: unparseable share, score histogram, all-equal rate, meta candidates."""
    scores = [s for r in records.values() for response in r["scores"] for s in response]
    total = max(len(scores), 1)
    valid = [s for s in scores if s is not None]
    stats = {"judge_unparseable_fraction": (len(scores) - len(valid)) / total if scores else 0.0}
    for level in range(int(cfg.score_low), int(cfg.score_high) + 1):
        stats[f"judge_score_hist_{level}"] = sum(round(s) == level for s in valid) / total
    equal = 0
    for r in records.values():
        means = [aggregate_scores(s).mean for s in r["scores"]]
        equal += None not in means and len(set(means)) == 1
    stats["judge_all_equal_rate"] = equal / max(len(records), 1)
    stats["meta_candidates"] = float(sum(bool(r.get("meta")) and "chosen" in r["meta"] for r in records.values()))
    return stats


def batch_metrics(slots: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Self-Rewarding's per-batch metrics over the batch's slots (fillers excluded)."""
    size = max(len(slots), 1)
    pairs = [s for s in slots if s["kind"] == RESPONSE]

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else 0.0

    return {
        # The judge's failures, counted even where a meta-judge pair took the bad sample's place in the batch.
        "bad_samples_per_GBS": sum(s["kind"] == BAD or s.get("replaced") == BAD for s in slots) / size,
        "bad_ends_per_GBS": sum(bool(s["bad_end"]) for s in slots) / size,
        "meta_pairs_per_GBS": float(sum(s["kind"] == META for s in slots)),
        "chosen_lengths": mean([len(s["chosen"]) for s in pairs]),
        "reject_lengths": mean([len(s["rejected"]) for s in pairs]),
        "chosen_generated_rewards": mean([s["chosen_reward"] for s in pairs]),
        "rejected_generated_rewards": mean([s["rejected_reward"] for s in pairs]),
    }
