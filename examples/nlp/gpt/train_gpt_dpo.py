"""DPO (and IPO, RPO, scale) training of a GPT model; full-parameter or LoRA.

    python examples/nlp/gpt/train_gpt_dpo.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        "model.data.data_prefix={train: [train.jsonl], validation: [val.jsonl], test: [val.jsonl]}" \\
        ++model.dpo.ref_policy_kl_penalty=0.1
    # LoRA: add model.peft.peft_scheme=lora

Any key of conf/gpt_dpo.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no cyclic collections while the imports load (~0.3 s); hydra_runner freezes them, then enables

from omegaconf import DictConfig

from nemo_aligner.recipes import dpo
from nemo_aligner.utils.config import hydra_runner


@hydra_runner(config_path="conf", config_name="gpt_dpo")
def main(cfg: DictConfig) -> None:
    dpo.run(cfg)


if __name__ == "__main__":
    main()
