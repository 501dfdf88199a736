"""Supervised fine-tuning of a GPT model.

    python examples/nlp/gpt/train_gpt_sft.py                      # the embedded default (tiny model, bundled data)
    python examples/nlp/gpt/train_gpt_sft.py model.restore_from_path=/path/to/base.nemo \\
        model.data.train_ds.file_path=train.jsonl model.data.validation_ds.file_path=val.jsonl

Any key of conf/gpt_sft.yaml can be overridden (Hydra syntax). ``main(cfg)`` runs in-process with a config.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no cyclic collections while the imports load (~0.3 s); hydra_runner freezes them, then enables

from omegaconf import DictConfig

from nemo_aligner.recipes import sft
from nemo_aligner.recipes.sft import ARCHITECTURE_KEYS, use_checkpoint_architecture  # noqa: F401 (names this script has offered)
from nemo_aligner.utils.config import hydra_runner


@hydra_runner(config_path="conf", config_name="gpt_sft")
def main(cfg: DictConfig) -> None:
    sft.run(cfg)


if __name__ == "__main__":
    main()
