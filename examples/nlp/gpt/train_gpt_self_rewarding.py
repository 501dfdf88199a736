"""Self-Rewarding (Yuan et al. 2024, arXiv 2401.10020) and Meta-Rewarding (Wu et al. 2024, arXiv 2407.19594) of a
GPT model: SPIN's iterations with responses judged by the model itself.

    python examples/nlp/gpt/train_gpt_self_rewarding.py pretrained_checkpoint.restore_from_path=/path/to/sft.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl \\
        trainer.self_rewarding.max_iterations=3 model.spin.ref_policy_kl_penalty=0.1 model.spin.use_meta_judge=true
    # the embedded default's tiny judge model (scripts/build_tiny_base_model.py --with_judge):
    #   --config-name gpt_self_rewarding_tiny pretrained_checkpoint.restore_from_path=...

Any key of conf/gpt_self_rewarding.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no cyclic collections while the imports load (~0.3 s); hydra_runner freezes them, then enables

from omegaconf import DictConfig

from nemo_aligner.recipes import self_rewarding
from nemo_aligner.recipes.self_rewarding import validate_self_rewarding_config  # noqa: F401 (names this script has offered)
from nemo_aligner.utils.config import hydra_runner


@hydra_runner(config_path="conf", config_name="gpt_self_rewarding")
def main(cfg: DictConfig) -> None:
    self_rewarding.run(cfg)


if __name__ == "__main__":
    main()
