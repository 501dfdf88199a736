"""The GPU-sized configs (gpt_dpo / gpt_spin / gpt_self_rewarding / gpt_sft.yaml) train in bf16 with
megatron_amp_O2 as NeMo-Aligner's do; tests that run them on the CPU add these overrides, so their exact
expectations hold in fp32. The *_tiny configs are fp32 already."""

FP32 = ("trainer.precision=32", "model.megatron_amp_O2=false")
