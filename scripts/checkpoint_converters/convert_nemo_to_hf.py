"""Convert a Llama-style ``.nemo`` checkpoint into a Hugging Face model directory.

Usage::

    python scripts/checkpoint_converters/convert_nemo_to_hf.py \\
        --input_name_or_path /path/to/model.nemo --output_path /path/to/hf_model_dir

Writes ``config.json`` (``LlamaForCausalLM``, or ``Qwen2ForCausalLM`` when the model has a q/k/v bias),
``model.safetensors`` in the dtype of the model's ``precision``, ``generation_config.json`` and the tokenizer
from the ``.nemo`` artifacts (``save_pretrained`` files for a Hugging Face tokenizer, the original files
otherwise). The HF ``vocab_size`` is the model's embedding rows at TP=1, so logits match the NeMo model's
exactly. Mapping details: ``nemo_aligner/checkpoint/hf_conversion.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import open_dict
from safetensors.torch import save_file

from nemo_aligner.checkpoint.hf_conversion import hf_config_from_nemo, hf_state_dict_from_nemo
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.distributed import set_model_parallel_from_config

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_name_or_path", required=True, help="the .nemo file (or unpacked directory)")
    parser.add_argument("--output_path", required=True, help="the Hugging Face model directory to write")
    return parser.parse_args(argv)


def restore_single_rank(nemo_path: Path) -> MegatronGPTModel:
    """Restore the checkpoint in this single process (TP = PP = 1, whatever layout it was trained with)."""
    cfg = MegatronGPTModel.restore_from(nemo_path, return_config=True)
    with open_dict(cfg):
        cfg.tensor_model_parallel_size = 1
        cfg.pipeline_model_parallel_size = 1
        cfg.sequence_parallel = False
    set_model_parallel_from_config(cfg)  # this one-process tool is its own launcher
    return MegatronGPTModel.restore_from(nemo_path, override_config_path=cfg)


def _token_id(value: int | None) -> int | None:
    """NeMo reports a missing special token as None or -1; HF wants null."""
    return value if value is not None and value >= 0 else None


def write_tokenizer(model: MegatronGPTModel, output_dir: Path) -> None:
    """A Hugging Face tokenizer is saved with ``save_pretrained``; other tokenizers' files are copied as stored."""
    if hasattr(model.tokenizer, "save_pretrained"):
        model.tokenizer.save_pretrained(output_dir)
        return
    tokenizer_cfg = model.cfg.get("tokenizer") or {}
    files = [Path(tokenizer_cfg[key]) for key in ("model", "vocab_file", "merge_file") if tokenizer_cfg.get(key)]
    for file in files:
        shutil.copyfile(file, output_dir / file.name)
    if not files:
        logger.warning(
            "tokenizer.library %r has no files to export; write the tokenizer yourself", tokenizer_cfg.get("library")
        )


def convert(nemo_path: Path, output_dir: Path) -> None:
    """Restore ``nemo_path`` and write it as a Hugging Face model directory ``output_dir``."""
    if not nemo_path.exists():
        raise FileNotFoundError(f"{nemo_path}: no such .nemo file or directory")
    model = restore_single_rank(nemo_path)
    tokenizer = model.tokenizer
    vocab_size = model.padded_vocab_size
    config = hf_config_from_nemo(model.cfg, vocab_size, _token_id(tokenizer.bos_id), _token_id(tokenizer.eos_id))
    dtype = getattr(torch, config["dtype"])
    weights = hf_state_dict_from_nemo(model.model_state_dict_in_cpu(), model.cfg, vocab_size)
    output_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(dtype).contiguous() for k, v in weights.items()}, output_dir / "model.safetensors", {"format": "pt"}
    )
    _write_json(output_dir / "config.json", config)
    generation: dict[str, Any] = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    pad_id = _token_id(tokenizer.pad_id)
    if pad_id is not None:
        generation["pad_token_id"] = pad_id
    _write_json(output_dir / "generation_config.json", generation)
    write_tokenizer(model, output_dir)
    logger.info("Wrote %s", output_dir)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(Path(args.input_name_or_path), Path(args.output_path))
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"convert_nemo_to_hf: error: {err}") from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
