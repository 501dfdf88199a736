"""Batched, KV-cached generation from a ``MegatronGPTModel`` (SPIN / Self-Rewarding rollouts, evaluation).

How a batch runs (the scheme of NeMo and of megatron-core's static engine):

* Every sample keeps its true positions 0, 1, ...: the prompts are processed together up to the shortest
  prompt's length in one forward that fills megatron-core's static KV cache, then one position per forward.
  At a position still inside a longer prompt, that sample is fed its next prompt token (its logits are not
  used); elsewhere it is fed the token chosen from its logits. No padding ever sits between a sample's tokens,
  so with the plain causal mask each sample sees the same tokens at the same positions (RoPE or learned) as
  when generated alone; only float rounding of the batched matrix products differs.
* A sample stops at an end token/string or at its length limit, ``min(max_length, encoder_seq_length -
  prompt_length)`` new tokens. Finished samples are dropped from the batch and the KV cache whenever they are a
  quarter of it, so long responses do not pay for short ones.
* Sampling draws one uniform number per generated position from the sample's own ``torch.Generator`` seeded
  with its key (:mod:`nemo_aligner.generation.sampling`): results do not depend on the batch, the data-parallel
  layout or on resuming.
* Under tensor parallelism megatron-core gathers the vocabulary-parallel logits of the last position in
  inference mode; every tensor-parallel rank then holds the same logits and picks the same token.
* Under pipeline parallelism each forward runs stage by stage: a stage receives the previous stage's hidden
  states, runs its layers (each stage keeps the KV cache of its own layers) and sends its output on. The last
  stage broadcasts the logits of the last position to its pipeline, so every stage chooses the same tokens with
  the same generators and keeps the same per-sample state. (Logits rather than tokens: the log-probs that
  ``compute_logprob``/``all_probs`` return come from them too; they are ``[batch, vocabulary]`` per step.)
* Speed (``fast_decode``, on by default): the one-token steps after the prefill run through
  :class:`~nemo_aligner.generation.fast_decode.FastDecoder`, megatron-core's arithmetic without its per-module
  overhead, where it supports the model (one process, float32, plain local spec); and the loop runs outside the
  CPU-support function mode (:func:`~nemo_aligner.utils.cpu_support.device_rewrites_suspended`). Both leave the
  results unchanged (``tests/generation/test_fast_decode.py``); ``fast_decode=False`` is the plain path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from megatron.core import parallel_state

from nemo_aligner.generation.fast_decode import FastDecoder, unsupported_reason
from nemo_aligner.generation.sampling import LengthParams, SamplingParams, choose_tokens, draw_uniforms
from nemo_aligner.generation.stopping import EndDetector
from nemo_aligner.utils import cpu_support, mcore_compat
from nemo_aligner.utils.device import model_device
from nemo_aligner.utils.distributed import (
    broadcast_from_last_pipeline_stage,
    receive_from_previous_pipeline_stage,
    send_to_next_pipeline_stage,
)


class GenerationModel(Protocol):
    """What generation reads of a model (a ``MegatronGPTModel`` of ``nemo_aligner.models``; generation sits below
    the models and does not import them)."""

    model: torch.nn.Module
    tokenizer: Any
    transformer_config: Any
    autocast_dtype: torch.dtype | None
    encoder_seq_length: int
    padded_vocab_size: int


@dataclass
class GenerationOutput:
    """What :func:`generate` returns, one entry per prompt in the order given.

    ``logprobs[i]`` (with ``compute_logprob``) holds, for each response token, its float32 log-probability under
    the model's own distribution: ``log_softmax`` of the raw logits over the whole (padded) vocabulary at that
    position, exactly what ``MegatronGPTModel.get_logprobs`` gives for the full sequence. Temperature, top-k/top-p,
    repetition penalty and the end-token / vocabulary-padding masks change which token is drawn, never its
    log-prob. ``full_logprobs[i]`` (with ``all_probs``) is that whole distribution, ``[response_length, V]``.
    """

    token_ids: list[list[int]]
    prompt_lengths: list[int]
    response_lengths: list[int]
    ended: list[bool]
    logprobs: list[torch.Tensor] | None = None
    full_logprobs: list[torch.Tensor] | None = None

    @property
    def response_ids(self) -> list[list[int]]:
        """The generated tokens of each sample (end token included)."""
        return [ids[start:] for ids, start in zip(self.token_ids, self.prompt_lengths)]


def generate(
    model: GenerationModel,
    prompts: Sequence[Sequence[int]],
    sampling_params: Mapping[str, Any],
    length_params: Mapping[str, Any],
    seeds: Sequence[int] | None = None,
    fast_decode: bool = True,
) -> GenerationOutput:
    """Generate one response per prompt (token-id lists of any lengths) with a KV cache.

    ``sampling_params`` and ``length_params`` are NeMo's dicts (see :class:`SamplingParams`, :class:`LengthParams`).
    ``seeds`` gives each sample its random key; required unless ``use_greedy``. A collective call under tensor
    and pipeline parallelism: every tensor- and pipeline-parallel rank passes the same prompts and seeds.
    ``fast_decode=False`` turns off the speed-ups of the module docstring (to measure or rule them out).
    """
    sampling = SamplingParams.from_config(sampling_params)
    lengths = LengthParams.from_config(length_params)
    if model.transformer_config.sequence_parallel:
        raise NotImplementedError(
            "generation with sequence parallelism is not supported: set model.sequence_parallel=False"
        )
    if not sampling.use_greedy and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError(f"generate: sampling needs one seed per prompt ({len(prompts)}), got {seeds!r}")
    tokenizer = model.tokenizer
    if sampling.add_BOS and (tokenizer.bos_id is None or tokenizer.bos_id < 0):
        raise ValueError("sampling_params.add_BOS is true but the tokenizer has no BOS token; set add_BOS: false")
    bos = [tokenizer.bos_id] if sampling.add_BOS else []
    prompts = [bos + [int(t) for t in p] for p in prompts]
    context = model.encoder_seq_length
    for i, prompt in enumerate(prompts):
        if not 0 < len(prompt) <= context:
            raise ValueError(
                f"generate: prompt {i} has {len(prompt)} tokens; it needs 1 to model.encoder_seq_length ({context})"
            )
    budgets = [min(lengths.max_length, context - len(p)) for p in prompts]
    # CPU generators on every device: a seed draws the same uniforms on a CPU and on a GPU (sampling.draw_uniforms).
    generators = None if sampling.use_greedy else [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    end = EndDetector(tokenizer, sampling.end_strings)
    decoder = _BatchDecoder(model, sampling, lengths.min_length, end, prompts, budgets, generators)
    fast = fast_decode and unsupported_reason(model.model, model.autocast_dtype) is None
    suspended = cpu_support.device_rewrites_suspended() if fast_decode else contextlib.nullcontext()

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _model_autocast(model), suspended:
            responses = decoder.run(fast)
    finally:
        model.train(was_training)
    return GenerationOutput(
        token_ids=[p + r.tokens for p, r in zip(prompts, responses)],
        prompt_lengths=[len(p) for p in prompts],
        response_lengths=[len(r.tokens) for r in responses],
        ended=[r.ended for r in responses],
        logprobs=(
            [torch.tensor(r.logprobs, dtype=torch.float32, device="cpu") for r in responses]
            if sampling.compute_logprob
            else None
        ),
        full_logprobs=(
            [
                torch.stack(r.full_logprobs)
                if r.full_logprobs
                else torch.zeros(0, model.padded_vocab_size, device="cpu")
                for r in responses
            ]
            if sampling.all_probs
            else None
        ),
    )


def _model_autocast(model: GenerationModel) -> torch.autocast:
    """The mixed-precision context ``MegatronGPTModel.forward`` runs under."""
    device_type = model_device(model).type
    return torch.autocast(device_type, dtype=model.autocast_dtype, enabled=model.autocast_dtype is not None)


@dataclass
class _Response:
    tokens: list[int] = field(default_factory=list)
    ended: bool = False
    logprobs: list[float] = field(default_factory=list)
    full_logprobs: list[torch.Tensor] = field(default_factory=list)


class _BatchDecoder:
    """The decoding loop over one batch (see the module docstring).

    Per-sample state is indexed by *row* (the samples with room to generate, in prompt order); the KV cache holds
    the rows listed in ``active``, in that order, and shrinks as rows finish.
    """

    def __init__(
        self,
        model: GenerationModel,
        sampling: SamplingParams,
        min_length: int,
        end: EndDetector,
        prompts: list[list[int]],
        budgets: list[int],
        generators: list[torch.Generator] | None,
    ) -> None:
        self.gpt = model.model
        self.hidden_size = model.transformer_config.hidden_size
        self.pipeline_dtype = model.transformer_config.pipeline_dtype or torch.float32
        self.sampling = sampling
        self.min_length = min_length
        self.end = end
        self.device = model_device(model)
        self.vocab_size = model.padded_vocab_size
        self.tokenizer_vocab_size = model.tokenizer.vocab_size
        self.end_ids = torch.tensor(end.end_ids, dtype=torch.long, device=self.device)
        self.responses = [_Response() for _ in prompts]
        self.rows = [i for i, budget in enumerate(budgets) if budget > 0]
        self.budgets = [budgets[i] for i in self.rows]
        self.generators = None if generators is None else [generators[i] for i in self.rows]
        self.prompt_len = torch.tensor([len(prompts[i]) for i in self.rows], dtype=torch.long, device=self.device)
        self.max_total = max((len(prompts[i]) + budgets[i] for i in self.rows), default=0)
        longest = max((len(prompts[i]) for i in self.rows), default=0)
        self.prompts = torch.zeros(len(self.rows), longest, dtype=torch.long, device=self.device)
        for r, i in enumerate(self.rows):
            self.prompts[r, : len(prompts[i])] = torch.tensor(prompts[i], device=self.device)
        self.seen = None  # [rows, V] tokens already in each sequence, for the repetition penalty
        if not sampling.use_greedy and sampling.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(self.rows), self.vocab_size, dtype=torch.bool, device=self.device)
            for r, i in enumerate(self.rows):
                self.seen[r, self.prompts[r, : len(prompts[i])]] = True

    def run(self, fast: bool) -> list[_Response]:
        """Decode the batch; with ``fast``, the steps after the prefill run through :class:`FastDecoder`."""
        if not self.rows:
            return self.responses
        n_rows, device = len(self.rows), self.device
        cache = mcore_compat.StaticInferenceContext(n_rows, self.max_total)
        pos = int(self.prompt_len.min())
        logits = self._forward(self.prompts[:, :pos], torch.arange(pos, device=device).expand(n_rows, -1), cache)
        fast_decoder = FastDecoder(self.gpt, cache, pos) if fast else None
        active = torch.arange(n_rows, device=device)
        live = torch.ones(n_rows, dtype=torch.bool, device=device)
        while True:
            # ``logits`` predict position ``pos``: rows past their prompt choose it, the others read their prompt.
            next_tokens = self.prompts[active, min(pos, self.prompts.shape[1] - 1)]
            choosing = (live & (self.prompt_len[active] <= pos)).nonzero().squeeze(-1)
            if len(choosing):
                tokens, finished = self._choose(logits[choosing], active[choosing])
                next_tokens[choosing] = tokens
                live[choosing[finished]] = False
            if not live.any():
                return self.responses
            if 4 * int((~live).sum()) >= len(live):
                keep = live.nonzero().squeeze(-1)
                if fast_decoder is not None:
                    fast_decoder.keep(keep)
                for layer, (keys, values) in cache.key_value_memory_dict.items():
                    cache.key_value_memory_dict[layer] = (keys[:, keep], values[:, keep])
                active, live, next_tokens = active[keep], live[keep], next_tokens[keep]
            if fast_decoder is not None:
                logits = fast_decoder.step(next_tokens, pos)
            else:
                positions = torch.full((len(active), 1), pos, device=device)
                logits = self._forward(next_tokens[:, None], positions, cache)
            pos += 1

    def _forward(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: mcore_compat.StaticInferenceContext
    ) -> torch.Tensor:
        """float32 logits ``[B, V]`` at each row's last position; appends ``tokens`` to the KV cache.

        With pipeline parallelism this stage's layers run on the previous stage's hidden states ``[S, B, H]``
        and the logits come from the last stage (module docstring).
        """
        batch, length = tokens.shape
        if not parallel_state.is_pipeline_first_stage():
            hidden = receive_from_previous_pipeline_stage((length, batch, self.hidden_size), self.pipeline_dtype)
            self.gpt.set_input_tensor(hidden)
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=tokens.device), 1)[None, None]
        output = self.gpt(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=causal if length > 1 else None,
            inference_context=cache,
            runtime_gather_output=True,
        )
        cache.increment_sequence_len_offset(length)
        if not parallel_state.is_pipeline_last_stage():
            send_to_next_pipeline_stage(output.to(self.pipeline_dtype))
            return broadcast_from_last_pipeline_stage(None, (batch, self.vocab_size))
        return broadcast_from_last_pipeline_stage(output[:, -1].float(), (batch, self.vocab_size))

    def _choose(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pick the next token of ``rows`` from their logits; record it; return (tokens, finished mask)."""
        row_list = rows.tolist()
        lengths = [len(self.responses[self.rows[r]].tokens) for r in row_list]
        masked = logits.clone()
        masked[:, self.tokenizer_vocab_size :] = float("-inf")  # vocabulary padding
        too_short = torch.tensor(lengths, device=self.device) < self.min_length
        if too_short.any() and len(self.end_ids):
            masked[too_short.nonzero(), self.end_ids] = float("-inf")
        uniforms = None if self.generators is None else draw_uniforms([self.generators[r] for r in row_list])
        seen = None if self.seen is None else self.seen[rows]
        tokens = choose_tokens(masked, self.sampling, seen, uniforms)
        if self.seen is not None:
            self.seen[rows, tokens] = True
        keep_logprobs = self.sampling.compute_logprob or self.sampling.all_probs
        logprobs = torch.log_softmax(logits, dim=-1) if keep_logprobs else None
        chosen_logprobs = logprobs.gather(1, tokens[:, None])[:, 0].tolist() if keep_logprobs else None
        finished = []
        for j, (r, token) in enumerate(zip(row_list, tokens.tolist())):
            response = self.responses[self.rows[r]]
            response.tokens.append(token)
            if self.sampling.compute_logprob:
                response.logprobs.append(chosen_logprobs[j])
            if self.sampling.all_probs:
                response.full_logprobs.append(logprobs[j].cpu())
            response.ended = lengths[j] + 1 >= self.min_length and self.end.has_ended(response.tokens)
            finished.append(response.ended or lengths[j] + 1 >= self.budgets[r])
        return tokens, torch.tensor(finished, dtype=torch.bool, device=self.device)
