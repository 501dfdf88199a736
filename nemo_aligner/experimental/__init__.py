"""NeMo-Aligner's ``nemo_aligner.experimental`` import paths (PR #321's Self-Rewarding), thin entries to the
algorithms in ``nemo_aligner.algorithms``."""
