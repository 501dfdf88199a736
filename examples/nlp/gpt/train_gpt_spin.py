"""SPIN (Self-Play Fine-Tuning) of a GPT model.

    python examples/nlp/gpt/train_gpt_spin.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        trainer.spin.max_iterations=1 model.spin.ref_policy_kl_penalty=0.1
    # the embedded default's tiny model: --config-name gpt_spin_tiny pretrained_checkpoint.restore_from_path=...

Any key of conf/gpt_spin.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no cyclic collections while the imports load (~0.3 s); hydra_runner freezes them, then enables

from omegaconf import DictConfig

from nemo_aligner.recipes import spin
from nemo_aligner.utils.config import hydra_runner


@hydra_runner(config_path="conf", config_name="gpt_spin")
def main(cfg: DictConfig) -> None:
    spin.run(cfg)


if __name__ == "__main__":
    main()
