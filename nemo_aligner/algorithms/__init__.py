"""Training loops: SupervisedTrainer, DPOTrainer, SPINTrainer, SelfRewardingTrainer."""
