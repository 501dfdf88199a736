"""LLM-as-a-judge utilities for Self-Rewarding (Yuan et al. 2024) and Meta-Rewarding (Wu et al. 2024) training.

Pure functions the trainer composes: judge prompts (``prompts``), chat-template removal (``chat``), score and verdict
parsing (``parsing``), preference-pair choice with length control (``pairs``) and the meta-judge's Elo ranking and
batch share (``meta``).
"""

from nemo_aligner.judges.chat import normalise_prompt, normalise_response
from nemo_aligner.judges.meta import (
    JudgementRanking,
    bradley_terry_elo,
    meta_judge_comparisons,
    most_disputed_response,
    rank_judgements,
    select_meta_judge_pairs,
)
from nemo_aligner.judges.pairs import (
    BadSample,
    BadSampleReason,
    Candidate,
    JudgeScore,
    Pair,
    aggregate_scores,
    length_control_for_iteration,
    select_pair,
)
from nemo_aligner.judges.parsing import (
    DEFAULT_JUDGE_REWARD_REGEX,
    DEFAULT_META_JUDGE_REWARD_REGEX,
    judge_reward_regex,
    meta_judge_reward_regex,
    parse_score,
    parse_verdict,
)
from nemo_aligner.judges.prompts import (
    DEFAULT_JUDGE_PROMPT,
    DEFAULT_META_JUDGE_PROMPT,
    FittedPrompts,
    PromptTemplate,
    fit_judge_prompts,
    fit_to_context,
    judge_prompt_template,
    meta_judge_prompt_template,
)

__all__ = [
    "DEFAULT_JUDGE_PROMPT",
    "DEFAULT_JUDGE_REWARD_REGEX",
    "DEFAULT_META_JUDGE_PROMPT",
    "DEFAULT_META_JUDGE_REWARD_REGEX",
    "BadSample",
    "BadSampleReason",
    "Candidate",
    "FittedPrompts",
    "JudgeScore",
    "JudgementRanking",
    "Pair",
    "PromptTemplate",
    "aggregate_scores",
    "bradley_terry_elo",
    "fit_judge_prompts",
    "fit_to_context",
    "judge_prompt_template",
    "judge_reward_regex",
    "length_control_for_iteration",
    "meta_judge_comparisons",
    "meta_judge_prompt_template",
    "meta_judge_reward_regex",
    "most_disputed_response",
    "normalise_prompt",
    "normalise_response",
    "parse_score",
    "parse_verdict",
    "rank_judgements",
    "select_meta_judge_pairs",
    "select_pair",
]
