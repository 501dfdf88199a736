"""Checkpoint file formats: the NeMo `.nemo` container (config, artifacts, weights layouts)."""
