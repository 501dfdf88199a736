"""Datasets, collate functions and batch samplers shared by the SFT, DPO, SPIN and Self-Rewarding loops."""
