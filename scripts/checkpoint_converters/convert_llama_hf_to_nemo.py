"""Convert a local Hugging Face Llama / Mistral / Qwen2 checkpoint into a ``.nemo`` file.

Usage::

    python scripts/checkpoint_converters/convert_llama_hf_to_nemo.py \\
        --input_name_or_path /path/to/hf_model_dir --output_path /path/to/model.nemo [--precision 32|bf16]

The directory must hold ``config.json``, the weights (``model.safetensors``, sharded ``*.safetensors`` listed in
``model.safetensors.index.json``, or ``pytorch_model.bin`` / its sharded index) and the tokenizer
(``tokenizer.json``, or a SentencePiece ``tokenizer.model``). Nothing is downloaded: save a Hub model locally with
``save_pretrained`` first. The tokenizer file travels into the ``.nemo`` as an artifact. ``--precision`` sets the
config's training precision (default: from the HF ``dtype``); the weights are stored in float32 either way, so
the conversion is lossless. Mapping details: ``nemo_aligner/checkpoint/hf_conversion.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from nemo_aligner.checkpoint.hf_conversion import hf_architecture, nemo_config_from_hf, nemo_state_dict_from_hf
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.tokenizers import build_tokenizer
from nemo_aligner.utils.distributed import set_model_parallel_from_config

logger = logging.getLogger(__name__)

PRECISIONS = {"32": 32, "bf16": "bf16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input_name_or_path", required=True, help="local Hugging Face model directory")
    parser.add_argument("--output_path", required=True, help="the .nemo file to write")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), help="model precision (default: the HF dtype)")
    return parser.parse_args(argv)


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` of a local model directory; FileNotFoundError names what is missing."""
    if not model_dir.is_dir():
        raise FileNotFoundError(
            f"{model_dir}: no such local directory (Hub names are never downloaded; save the model locally first)"
        )
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; not a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: not valid JSON ({err})") from err


def _sharded_files(model_dir: Path, index_name: str) -> list[Path]:
    index_file = model_dir / index_name
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_file}: not a weight index with a 'weight_map' ({err!r})") from err
    return [model_dir / name for name in sorted(set(weight_map.values()))]


def _load_torch_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_hf_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All weights of a local model directory: safetensors (single or sharded), else ``pytorch_model.bin``."""
    candidates = [
        ("model.safetensors.index.json", load_file),
        ("model.safetensors", load_file),
        ("pytorch_model.bin.index.json", _load_torch_bin),
        ("pytorch_model.bin", _load_torch_bin),
    ]
    for name, load in candidates:
        path = model_dir / name
        if not path.is_file():
            continue
        files = _sharded_files(model_dir, name) if name.endswith(".index.json") else [path]
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{path} lists {file.name}, which is missing")
            state_dict.update(load(str(file)))
        return state_dict
    raise FileNotFoundError(f"{model_dir}: no weights; expected one of {', '.join(name for name, _ in candidates)}")


def tokenizer_config(model_dir: Path) -> dict[str, Any]:
    """The NeMo ``tokenizer`` config for the tokenizer files of a local model directory."""
    if (model_dir / "tokenizer.json").is_file():
        return {"library": "huggingface", "type": str(model_dir.resolve()), "use_fast": True}
    if (model_dir / "tokenizer.model").is_file():
        return {"library": "sentencepiece", "model": str(model_dir / "tokenizer.model")}
    raise FileNotFoundError(f"{model_dir}: no tokenizer.json or tokenizer.model; the .nemo needs a tokenizer")


def convert(model_dir: Path, output_path: Path, precision: str | None) -> None:
    """Read the HF checkpoint in ``model_dir`` and write it as the ``.nemo`` file ``output_path``."""
    hf_config = read_hf_config(model_dir)
    hf_architecture(hf_config)  # fail on an unsupported model before loading anything else
    tokenizer_cfg = tokenizer_config(model_dir)
    tokenizer = build_tokenizer(tokenizer_cfg)
    cfg = nemo_config_from_hf(hf_config, tokenizer_vocab_size=tokenizer.vocab_size)
    if precision is not None:
        cfg["precision"] = PRECISIONS[precision]
    cfg["tokenizer"] = tokenizer_cfg
    hf_state_dict = read_hf_state_dict(model_dir)
    set_model_parallel_from_config(cfg)  # this one-process tool is its own launcher
    model = MegatronGPTModel(cfg, tokenizer=tokenizer)
    model.load_model_state_dict(nemo_state_dict_from_hf(hf_state_dict, cfg, padded_vocab=model.padded_vocab_size))
    model.save_to(output_path)
    logger.info("Wrote %s", output_path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        convert(Path(args.input_name_or_path), Path(args.output_path), args.precision)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"convert_llama_hf_to_nemo: error: {err}") from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
