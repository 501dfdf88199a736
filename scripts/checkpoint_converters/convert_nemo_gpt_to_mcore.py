"""Convert a legacy (pre-Megatron-Core, ``mcore_gpt: false``) NeMo GPT ``.nemo`` into a Megatron-Core ``.nemo``.

Usage (the command of NeMo-Aligner's guides, e.g. for NVIDIA's GPT-2B-001)::

    tar -xvf GPT-2B-001_bf16_tp1.nemo -C model_dir
    python scripts/checkpoint_converters/convert_nemo_gpt_to_mcore.py --in-folder model_dir --out-file mcore_gpt.nemo

``--in-file X.nemo`` reads the tar directly (no need to extract it). Unlike NeMo's converter, checkpoints saved
with tensor or pipeline parallelism (``mp_rank_XX/``, ``tp_rank_XX_pp_rank_YYY/``) are merged here, so there is no
``megatron_change_num_partitions.py`` step; the output says TP = PP = 1 and loads at any layout. Weights are
stored in the converted model's parameter dtype (float32 unless ``megatron_amp_O2``; bf16 to float32 is exact).
As in NeMo's converter, an existing output is left alone unless ``--overwrite`` is given;
``--cpu-only`` is accepted for compatibility and does nothing (conversion always runs on the CPU).
Mapping details: ``nemo_aligner/checkpoint/legacy_conversion.py``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from omegaconf import OmegaConf

from nemo_aligner.checkpoint import legacy_conversion, nemo_file
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.tokenizers import build_tokenizer
from nemo_aligner.utils.distributed import set_model_parallel_from_config

logger = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--in-folder", "--input-name-or-path", dest="source", help="extracted legacy .nemo directory")
    source.add_argument("--in-file", dest="source", help="legacy .nemo file (tar)")
    parser.add_argument("--out-file", "--output-path", dest="out_file", required=True, help="the .nemo to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--cpu-only", action="store_true", help="accepted for compatibility; always on the CPU")
    return parser.parse_args(argv)


def convert(source: Path, out_file: Path) -> None:
    """Read the legacy checkpoint at ``source`` (file or directory) and write ``out_file``."""
    with nemo_file.open_nemo(source) as unpacked:
        stored_cfg = nemo_file.read_model_config(unpacked)
        if nemo_file.detect_weights_layout(unpacked) != "legacy":
            raise ValueError(f"{source}: already a Megatron-Core (torch_dist) checkpoint; load it directly")
        cfg = OmegaConf.to_container(nemo_file.resolve_artifact_paths(stored_cfg, unpacked), resolve=True)
        legacy = legacy_conversion.load_legacy_gpt_state_dict(unpacked, cfg)
        if not legacy_conversion.is_legacy_gpt(cfg, legacy):
            raise ValueError(
                f"{source}: weights are not named model.language_model.* (or mcore_gpt is true): not a legacy GPT "
                "checkpoint; MegatronGPTModel.restore_from reads it directly"
            )
        state_dict = legacy_conversion.mcore_state_dict_from_legacy(legacy, cfg)
        new_cfg = legacy_conversion.mcore_config_from_legacy(cfg)
        tokenizer = build_tokenizer(new_cfg["tokenizer"])
        rows = state_dict["model.embedding.word_embeddings.weight"].shape[0]
        override = legacy_conversion.vocab_override(new_cfg, rows, tokenizer.vocab_size)
        if override is not None:
            new_cfg["override_vocab_size"] = override
        set_model_parallel_from_config(new_cfg)  # this one-process tool is its own launcher
        model = MegatronGPTModel(new_cfg, tokenizer=tokenizer)
        model.load_model_state_dict(state_dict, strict=True)
        model.save_to(out_file)  # inside the context: the tokenizer artifacts are still unpacked
    logger.info("Wrote %s", out_file)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_file = Path(args.out_file)
    if out_file.exists() and not args.overwrite:
        logger.info("%s exists; nothing to do (pass --overwrite to convert again)", out_file)
        return
    out_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        convert(Path(args.source), out_file)
    except (FileNotFoundError, ValueError) as err:  # NemoFormatError is a ValueError
        raise SystemExit(f"convert_nemo_gpt_to_mcore: error: {err}") from None


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
