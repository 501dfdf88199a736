"""Score every pair of a preference file with a model (the log-probs DPO precomputes for its reference).

    python examples/nlp/gpt/compute_reference_logprobs.py pretrained_checkpoint.restore_from_path=model.nemo \\
        data_path=pairs.jsonl output_path=scored.jsonl [emit_token_ids=true] [model.data.seq_length=...]

Each output line is the input line (same order) plus ``chosen_logp``, ``rejected_logp`` (summed over the scored
response tokens), ``chosen_num_tokens``, ``rejected_num_tokens``; with ``emit_token_ids=true`` also the full
scored sequences ``chosen_token_ids``, ``rejected_token_ids`` and ``prompt_num_tokens``. Pairs longer than
``model.data.seq_length`` are not scored: their line gets ``"dropped": true`` and the count is logged.
"""

from __future__ import annotations

import gc

if __name__ == "__main__":
    gc.disable()  # no cyclic collections while the imports load (~0.3 s); hydra_runner freezes them, then enables

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, open_dict

from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataloader, build_dpo_dataset
from nemo_aligner.data.nlp.dpo_dataset import scoring_lines
from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
from nemo_aligner.models.nlp.gpt.reference import compute_reference_logprobs
from nemo_aligner.recipes.common import (
    build_model,
    data_parallel_layout,
    model_config_for_training,
    resolve_and_create_trainer,
)
from nemo_aligner.utils.config import hydra_runner
from nemo_aligner.utils.distributed import is_global_rank_zero

logger = logging.getLogger(__name__)


@hydra_runner(config_path="conf", config_name="compute_reference_logprobs")
def main(cfg: DictConfig) -> None:
    missing = [k for k in ("pretrained_checkpoint.restore_from_path", "data_path", "output_path") if not _get(cfg, k)]
    if missing:
        raise ValueError(f"compute_reference_logprobs: set {', '.join(missing)}")
    trainer = resolve_and_create_trainer(cfg, "dpo")
    restore_path = cfg.pretrained_checkpoint.restore_from_path
    model_cfg = model_config_for_training(cfg, restore_path)
    with open_dict(model_cfg):
        model_cfg.data.seq_length = min(int(model_cfg.data.seq_length), int(model_cfg.encoder_seq_length))
    tokenizer, layout = data_parallel_layout(model_cfg, restore_path)
    dataset = build_dpo_dataset(
        model_cfg.data, cfg.data_path, tokenizer, dpo_cfg=model_cfg.get("dpo"), name="data_path"
    )

    model = build_model(MegatronGPTDPOModel, model_cfg, restore_path, trainer, tokenizer)
    per_rank = model.log_prob_micro_batch_size
    dataloader = build_dpo_dataloader(
        model_cfg.data,
        dataset,
        tokenizer,
        per_rank * layout["data_parallel_size"],
        train=False,
        **layout,
    )
    table = compute_reference_logprobs(model, dataloader)
    if is_global_rank_zero():
        write_scores(Path(cfg.output_path), dataset, table, bool(cfg.emit_token_ids))
    if dataset.num_dropped:
        logger.warning("%d pairs longer than model.data.seq_length were not scored", dataset.num_dropped)


def _get(cfg: DictConfig, key: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key)


def write_scores(output_path: Path, dataset, table, emit_token_ids: bool) -> None:
    """One output line per input line, in input order."""
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as out:
        for line in scoring_lines(dataset):
            record = dict(line.data)
            if line.index is None:
                record["dropped"] = True
            else:
                item = dataset[line.index]
                row = table.position[line.index]
                record.update(
                    chosen_logp=float(table.chosen[row]),
                    rejected_logp=float(table.rejected[row]),
                    chosen_num_tokens=int(item["chosen_length"]) - int(item["prompt_length"]),
                    rejected_num_tokens=int(item["rejected_length"]) - int(item["prompt_length"]),
                )
                if emit_token_ids:
                    record.update(
                        chosen_token_ids=[int(t) for t in item["chosen_ids"]],
                        rejected_token_ids=[int(t) for t in item["rejected_ids"]],
                        prompt_num_tokens=int(item["prompt_length"]),
                    )
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
