"""``nemo_aligner.experimental.self_rewarding.self_rewarding``: the import path of NeMo-Aligner's Self-Rewarding
(PR #321) for :class:`nemo_aligner.algorithms.self_rewarding.SelfRewardingTrainer` (the same class)."""

from nemo_aligner.algorithms.self_rewarding import SelfRewardingTrainer

__all__ = ["SelfRewardingTrainer"]
