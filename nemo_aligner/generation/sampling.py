"""Choosing the next token: NeMo's sampling/length parameters, logit processing and keyed sampling.

Processing follows NeMo's ``sample_sequence_batch``: greedy takes the argmax of the (masked) logits; sampling
divides by the temperature, applies the repetition penalty, then top-k, then top-p, and draws from the softmax.
Unlike NeMo, a draw uses one uniform number from the sample's own generator (inverse-CDF sampling), so a
sample's tokens depend only on its seed and its own logits, never on the batch it shares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

SAMPLING_KEYS = (
    "use_greedy",
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "end_strings",
    "add_BOS",
    "all_probs",
    "compute_logprob",
)
LENGTH_KEYS = ("max_length", "min_length")


def _check_keys(cfg: Mapping[str, Any], keys: tuple[str, ...], name: str) -> None:
    missing = [k for k in keys if k not in cfg]
    unknown = sorted(set(cfg) - set(keys))
    if missing or unknown:
        raise ValueError(f"{name}: missing keys {missing}, unknown keys {unknown}; expected exactly {', '.join(keys)}")


@dataclass(frozen=True)
class SamplingParams:
    """NeMo's ``sampling_params`` (same keys), validated.

    ``top_k=0`` and ``top_p`` of 0 or 1 disable those filters (NeMo's convention). ``repetition_penalty`` is
    CTRL's (Keskar et al. 2019, arXiv 1909.05858) as NeMo applies it: the logits of every token already in the
    prompt or response are divided by it (so a negative logit moves up, as in CTRL and NeMo); 1.0 disables it.
    Greedy decoding ignores temperature, top-k/top-p and the repetition penalty, as in NeMo.
    """

    use_greedy: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    end_strings: tuple[str, ...]
    add_BOS: bool
    all_probs: bool
    compute_logprob: bool

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SamplingParams:
        _check_keys(cfg, SAMPLING_KEYS, "sampling_params")
        params = cls(
            use_greedy=bool(cfg["use_greedy"]),
            temperature=float(cfg["temperature"]),
            top_k=int(cfg["top_k"]),
            top_p=float(cfg["top_p"]),
            repetition_penalty=float(cfg["repetition_penalty"]),
            end_strings=tuple(cfg["end_strings"] or ()),
            add_BOS=bool(cfg["add_BOS"]),
            all_probs=bool(cfg["all_probs"]),
            compute_logprob=bool(cfg["compute_logprob"]),
        )
        if not params.use_greedy and params.temperature <= 0:
            raise ValueError(f"sampling_params.temperature must be > 0 when sampling, got {params.temperature}")
        if params.top_k < 0:
            raise ValueError(f"sampling_params.top_k must be >= 0 (0 disables it), got {params.top_k}")
        if not 0.0 <= params.top_p <= 1.0:
            raise ValueError(f"sampling_params.top_p must be in [0, 1] (0 or 1 disables it), got {params.top_p}")
        if params.repetition_penalty <= 0:
            raise ValueError(
                f"sampling_params.repetition_penalty must be > 0 (1.0 disables it), got {params.repetition_penalty}"
            )
        if not all(isinstance(s, str) and s for s in params.end_strings):
            raise ValueError(f"sampling_params.end_strings must be non-empty strings, got {list(params.end_strings)}")
        return params


@dataclass(frozen=True)
class LengthParams:
    """NeMo's ``length_params``: at most ``max_length`` and at least ``min_length`` new tokens per prompt."""

    max_length: int
    min_length: int

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LengthParams:
        _check_keys(cfg, LENGTH_KEYS, "length_params")
        params = cls(max_length=int(cfg["max_length"]), min_length=int(cfg["min_length"]))
        if params.max_length < 0 or params.min_length < 0:
            raise ValueError(f"length_params.max_length and min_length must be >= 0, got {params}")
        return params


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as in NeMo: divide the logits of seen tokens (``seen``: bool, like ``logits``) by ``penalty``."""
    return torch.where(seen, logits / penalty, logits)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top ``top_k`` (ties kept) and outside the nucleus of mass ``top_p``.

    The nucleus (Holtzman et al. 2020, arXiv 1904.09751) is the smallest set of most probable tokens whose
    probability reaches ``top_p``: a token is kept when the mass of the tokens ranked before it is below ``top_p``.
    """
    if 0 < top_k < logits.shape[-1]:
        kth_largest = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass_before = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        mass_before = torch.cat([torch.zeros_like(mass_before[..., :1]), mass_before[..., :-1]], dim=-1)
        drop = torch.empty_like(mass_before, dtype=torch.bool).scatter_(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def draw_uniforms(generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One float64 uniform in [0, 1) from each sample's generator (one draw per generated position).

    On the generators' device (the CPU in :func:`~nemo_aligner.generation.decoding.generate`, so draws do not
    depend on where the model runs); :func:`sample_from_logits` moves them to the logits.
    """
    return torch.stack([torch.rand((), dtype=torch.float64, generator=g, device=g.device) for g in generators])


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling from ``softmax(logits)`` ``[N, V]`` with one uniform per row; never picks a -inf logit.

    Row n picks the first token whose cumulative probability exceeds ``uniforms[n]`` times the total mass; the
    cumulative sum is float64 so a vocabulary of 10^5 tokens keeps every token's interval.
    """
    probs = logits.float().softmax(dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    targets = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(-1)
    # u * total may round up to the total: fall back to the last token with probability > 0.
    last_possible = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)
    return torch.minimum(picked, last_possible)


def choose_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token of each row of ``logits`` ``[N, V]`` (already masked with -inf where not allowed).

    Greedy rows take the argmax; otherwise ``uniforms`` (``[N]``, see :func:`draw_uniforms`) drive the draw and
    ``seen`` (``[N, V]`` bool, needed when ``repetition_penalty != 1``) marks the tokens already in the sequence.
    """
    if params.use_greedy:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    logits = top_k_top_p_filter(logits, params.top_k, params.top_p)
    return sample_from_logits(logits, uniforms)
