"""Self-Rewarding (Yuan et al. 2024, arXiv 2401.10020) and Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594).

The SPIN loop (:class:`~nemo_aligner.algorithms.spin.SPINTrainer`: iterations of rollout + preference epochs, one LR
schedule, persisted rollouts, precomputed reference log-probs, resume) with a different rollout. Per iteration t,
with the iteration-start weights:

1. **Responses**: ``num_responses_to_gen`` (N) sampled responses per prompt, each keyed by (seed, t, sample, r).
2. **Judgements**: the same model judges every response ``num_evals_to_average`` (k) times with
   ``llm_judge_prompt`` (rendered on the chat-template-free prompt and response, wrapped in the chat template as
   a user turn); scores come from ``judge_reward_regex`` and are valid in ``[judge_score_low, judge_score_high]``;
   a response's score is the mean of its valid judgements.
3. **Pairs** (``nemo_aligner.judges.select_pair``): chosen/rejected with length control rho =
   ``length_control[t]``. A bad sample (fewer than two scored responses, all scores equal, identical chosen and
   rejected) is masked and counted; with ``trainer.self_rewarding.mask_unfinished_generations`` a pair whose chosen
   or rejected response never ended is masked too and counted as a bad end.
4. **Meta-judge** (``use_meta_judge``): for each prompt, the response whose judgements disagree most; its k
   judgements are compared pairwise in both orders with ``llm_meta_judge_prompt``, ranked by a Bradley-Terry fit,
   and (best, worst) judgement becomes a judge-training pair (prompt = the judge prompt). In every global batch of
   the iteration's first epoch, ``select_meta_judge_pairs`` picks at most ``meta_judge_pcnt`` x GBS of them (none
   when <= 0), capped per score class by ``meta_max_relative_pcnt``; they replace the batch's bad samples first,
   then its last pairs. Their ground-truth rewards (for ``rpo_*``/``scale`` losses) are the judgements'
   Bradley-Terry strengths; a response pair's are its judge scores.
5. **Train** ``max_epochs`` epochs with the preference loss of ``model.spin.preference_loss``; then the policy
   becomes the reference AND the optimizer moments are reset (each iteration is a fresh DPO run, as in the papers).

``first_iteration_sft``: iteration 0 generates nothing and trains the plain SFT loss on the ground truth (pairs
chosen = rejected = ground truth with preference weight 0 and SFT weight 1: the DPO term of identical sides has no
gradient), as the papers start from an SFT model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_aligner.algorithms.spin import SPINTrainer, _gather_dicts, sample_seed
from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
from nemo_aligner.data.nlp.dpo_dataset import filler_pair_item
from nemo_aligner.data.nlp.samplers import FILLER_INDEX
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
    length_control_for_iteration,
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
from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import _torch_optimizer_states
from nemo_aligner.utils.distributed import all_gather_data_parallel
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.timers import PhaseTimers

logger = logging.getLogger(__name__)

RESPONSE, META, SFT, BAD, BAD_END = "response", "meta", "sft", "bad", "bad_end"
"""Kinds of training slot: a judged response pair, a meta-judge pair, an SFT pair, a bad sample, a bad end."""


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
                self._judge_responses(chunk, items, records, iteration, seed)
                if cfg.use_meta_judge and cfg.meta_judge_pcnt > 0:
                    self._meta_judge(chunk, records, iteration, seed)
            kill_point("rollout")
        return records

    def _judge_responses(self, chunk, items, records, iteration: int, seed: int) -> None:
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
            slots[i] = _slot(prompts[i], [], [], 0.0, 0.0, BAD, reason=choice.reason.name)
            continue
        chosen, rejected = record["responses"][choice.chosen], record["responses"][choice.rejected]
        unfinished = not (record["ended"][choice.chosen] and record["ended"][choice.rejected])
        kind = BAD_END if unfinished and mask_unfinished else RESPONSE
        slots[i] = _slot(prompts[i], chosen, rejected, choice.chosen_score, choice.rejected_score, kind)
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
            slots[target] = _slot(
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


def _slot(prompt, chosen, rejected, chosen_reward: float, rejected_reward: float, kind: str, **extra) -> dict:
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


class SelfRewardingPairsDataset(torch.utils.data.Dataset):
    """The iteration's training slots indexed like the SFT dataset (``generated``: sample index -> slot)."""

    def __init__(self, sft_dataset, pad_id: int):
        self.sft_dataset = sft_dataset
        self.pad_id = pad_id
        self.generated: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.sft_dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index == FILLER_INDEX:
            return filler_pair_item(self.pad_id)
        slot = self.generated[index]
        prompt = slot["prompt"]
        chosen, rejected = slot["chosen"] or [self.pad_id], slot["rejected"] or [self.pad_id]
        return {
            "chosen_ids": torch.tensor(prompt + chosen, device="cpu"),
            "rejected_ids": torch.tensor(prompt + rejected, device="cpu"),
            "prompt_length": len(prompt),
            "chosen_length": len(prompt) + len(chosen),
            "rejected_length": len(prompt) + len(rejected),
            "chosen_reward": slot["chosen_reward"],
            "rejected_reward": slot["rejected_reward"],
            "sample_index": index,
            "valid": slot["kind"] in (RESPONSE, META, SFT),
        }


def restart_adam(optimizer) -> None:
    """Zero Adam's moments and restart its bias correction, as if the optimizer were new.

    The step count goes back to 1, not 0: megatron-core's checkpoint drops a zero step and would not resume from it.
    The first update after a restart is then Adam's step 2 on zero moments, ``(1 - b1) / (1 - b1^2) /
    sqrt((1 - b2) / (1 - b2^2))`` = 0.74 times a new optimizer's first update (b1 = 0.9, b2 = 0.999). Keeping the old
    count instead would make it ``(1 - b1) / sqrt(1 - b2)`` = 3.2 times: bias correction would no longer undo the
    zeroed moments, and every iteration would start with a jump.
    """
    for state in _torch_optimizer_states(optimizer):
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value.fill_(1) if name == "step" else value.zero_()


class SelfRewardingTrainer(SPINTrainer):
    """SPIN's loop with the Self-Rewarding / Meta-Rewarding rollout (module docstring); ``chat_prompt_tokens`` are
    the policy's ``model.data.chat_prompt_tokens`` (judge prompts are user turns in that template)."""

    def __init__(self, *args, chat_prompt_tokens: Mapping[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        spin = self.model.spin_config
        self.judge_cfg = JudgeConfig.from_config(spin)
        self.chat_prompt_tokens = dict(chat_prompt_tokens or {})
        self.loss_weights = (self.model.preference_loss_weight, self.model.sft_loss_weight)
        self.first_iteration_sft = bool(spin.get("first_iteration_sft", False))
        length_control = spin.get("length_control", 0.0)
        if isinstance(length_control, ListConfig):
            length_control = list(length_control)
        self.length_control = length_control

    def start_iteration(self) -> None:
        sft = self.first_iteration_sft and self.iteration == 0
        self.model.preference_loss_weight, self.model.sft_loss_weight = (0.0, 1.0) if sft else self.loss_weights
        super().start_iteration()

    def finish_iteration(self) -> None:
        """SPIN's reference refresh, plus an optimizer restart: each iteration starts a fresh run."""
        restart_adam(self.optimizer)
        super().finish_iteration()

    def _global_batches(self) -> list[list[int]]:
        """Sample indices of the iteration's first-epoch global batches, in training order."""
        sampler = self.train_dataloader.batch_sampler
        steps = min(self.steps_per_epoch, self.max_steps - self.iteration * self.steps_per_iteration)
        order = sampler.epoch_order(0)
        return [[i for i in sampler.global_batch(order, s) if i != FILLER_INDEX] for s in range(steps)]

    @torch.no_grad()
    def run_rollout(self) -> dict[str, Any]:
        spin = self.model.spin_config
        indices = self.needed_indices()
        prompts = {i: list(self.sft_dataset.prompt_and_answer(i)[0]) for i in indices}
        self.model.offload_adam_states()
        self.model.eval()
        rollout: dict[str, Any] = {"iteration": self.iteration, "indices": indices}
        if self.first_iteration_sft and self.iteration == 0:
            slots = {}
            for i in indices:
                answer = list(self.sft_dataset.prompt_and_answer(i)[1])
                slots[i] = _slot(prompts[i], answer, answer, 0.0, 0.0, SFT)
            rollout.update(records={}, stats={})
        else:
            dp_rank = parallel_state.get_data_parallel_rank()
            dp_size = parallel_state.get_data_parallel_world_size()
            context = int(self.model.cfg.encoder_seq_length)
            judged = JudgedRollout(self.model, spin, self.chat_prompt_tokens, context, timers=self.timers)
            mine = {i: prompts[i] for i in indices[dp_rank::dp_size]}
            records = _gather_dicts(judged.judge(mine, self.iteration, self.seed, int(spin.rollout_micro_batch_size)))
            rho = length_control_for_iteration(self.length_control, self.iteration, self.max_iterations)
            mask_unfinished = bool(self.cfg.get("mask_unfinished_generations", True))
            slots = build_pairs(
                records, prompts, self._global_batches(), self.judge_cfg, rho, mask_unfinished, self.seed
            )
            rollout.update(records=records, stats={**judge_health(records, self.judge_cfg), "length_control": rho})
        rollout["slots"] = slots
        return self.finish_rollout(rollout)

    def use_rollout(self, rollout: Mapping[str, Any], with_reference: bool = True) -> None:
        """Load the rollout's slots into the pairs dataset (and the reference table); log the judge's health."""
        dataset = self.train_dataloader.dataset
        dataset.generated = {int(i): dict(s) for i, s in rollout["slots"].items()}
        self.rollout_stats = dict(rollout.get("stats", {}))
        if with_reference:
            self.activate_rollout(rollout)

    def _log_samples(self, rollout: Mapping[str, Any], count: int = 4) -> None:
        """Prompt / chosen / rejected of the first ``count`` trained pairs (table ``train/pairs``)."""
        if self.logger is None:
            return
        rows = self.pair_rows(count)
        self.logger.log_table("train/pairs", ["kind", "prompt", "chosen", "rejected"], rows, step=self.step)

    def pair_rows(self, count: int) -> list[list[str]]:
        text = self.model.tokenizer.ids_to_text
        slots = [
            s for _, s in sorted(self.train_dataloader.dataset.generated.items()) if s["kind"] in (RESPONSE, META, SFT)
        ]
        return [[s["kind"], text(s["prompt"]), text(s["chosen"]), text(s["rejected"])] for s in slots[:count]]

    def train_single_step(self, batch: dict) -> dict[str, float]:
        metrics = super().train_single_step(batch)
        metrics.pop("avg_generated_lengths", None)
        metrics["rewards_chosen_mean"] = metrics.pop("rewards_actual_mean")
        metrics["rewards_rejected_mean"] = metrics.pop("rewards_generated_mean")
        generated = self.train_dataloader.dataset.generated
        indices = all_gather_data_parallel(batch["sample_index"])  # the global batch, not this rank's share
        slots = [generated[int(i)] for i in indices if int(i) != FILLER_INDEX]
        return {**metrics, **batch_metrics(slots)}

    def run_validation(self) -> dict[str, float]:
        """SPIN's validation SFT loss, plus a table of prompt / chosen / rejected (``val/pairs``)."""
        metrics = super().run_validation()
        if self.logger is not None and self.train_dataloader.dataset.generated:
            self.logger.log_table(
                "val/pairs", ["kind", "prompt", "chosen", "rejected"], self.pair_rows(4), step=self.step
            )
        return metrics
