"""nemo_aligner: LLM alignment (SFT, DPO, RLHF) on megatron-core, reading and writing NeMo .nemo checkpoints."""
