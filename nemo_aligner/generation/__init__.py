"""Batched, KV-cached text generation for rollouts (SPIN, Self-Rewarding) and evaluation."""

from nemo_aligner.generation.decoding import GenerationOutput, generate
from nemo_aligner.generation.sampling import LengthParams, SamplingParams
from nemo_aligner.generation.stopping import EndDetector

__all__ = ["EndDetector", "GenerationOutput", "LengthParams", "SamplingParams", "generate"]
