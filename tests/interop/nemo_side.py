"""Runs inside the separate NeMo 2.5.0 venv (never imported by the project): restore `.nemo` files with NVIDIA
NeMo's own `MegatronGPTModel.restore_from` on the CPU and record what NeMo computes from them.

    <nemo venv>/bin/python tests/interop/nemo_side.py REQUEST.json OUTPUT.pt

REQUEST.json: {"patches_dir": <folder holding nemo_cpu_patches.py>,
               "files": [{"name": ..., "path": <.nemo>, "input_ids": [[...], ...], "strings": [...]}, ...]}
OUTPUT.pt (torch.save): {name: {"logits": float32 [B, S, padded_vocab], "ids": [[...] per string],
                               "decoded": [...], "vocab_size", "padded_vocab_size", "bos_id", "eos_id", "pad_id",
                               "config": the restored model config as a plain dict}}
or {name: {"error": "<exception>"}} when NeMo cannot restore a file, so the caller can report every failure.

Logits come from NeMo's `forward(tokens, position_ids, attention_mask, labels=None)` with the mask and positions
of NeMo's `get_ltor_masks_and_position_ids`, in eval mode, fp32, as for the NeMo-written fixtures.
"""

import json
import sys
import traceback


def fresh_process_state() -> None:
    """Undo what building the previous model left in this process, so each file restores as in a fresh one:
    megatron-core's global micro-batch calculator (fixed by the first model's batch sizes) and the attention
    backend choice it records in NVTE_* environment variables."""
    import os

    from megatron.core import num_microbatches_calculator

    num_microbatches_calculator.destroy_num_microbatches_calculator()
    for name in ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN"):
        os.environ.pop(name, None)


def special_id(tokenizer, name: str):
    """NeMo's id, or None where NeMo's tokenizer has none (legacy SentencePiece without a named pad raises)."""
    try:
        return getattr(tokenizer, name)
    except AttributeError:
        return None


def main(request_path: str, output_path: str) -> None:
    request = json.load(open(request_path))
    sys.path.insert(0, request["patches_dir"])
    import nemo_cpu_patches

    nemo_cpu_patches.apply()
    import torch
    from nemo.collections.nlp.models.language_modeling.megatron_gpt_model import MegatronGPTModel
    from nemo.collections.nlp.modules.common.megatron.utils import get_ltor_masks_and_position_ids
    from omegaconf import OmegaConf

    trainer = nemo_cpu_patches.make_trainer()
    results = {}
    for item in request["files"]:
        fresh_process_state()
        try:
            model = MegatronGPTModel.restore_from(item["path"], trainer=trainer)
            model.eval()
            tokenizer = model.tokenizer
            tokens = torch.tensor(item["input_ids"], dtype=torch.long)
            attention_mask, _, position_ids = get_ltor_masks_and_position_ids(
                tokens, tokenizer.eos_id, False, False, False
            )
            with torch.no_grad():
                logits = model.forward(tokens, position_ids, attention_mask, None)
            ids = [list(map(int, tokenizer.text_to_ids(text))) for text in item["strings"]]
            results[item["name"]] = {
                "logits": logits.float().contiguous(),
                "ids": ids,
                "decoded": [tokenizer.ids_to_text(i) for i in ids],
                "vocab_size": int(tokenizer.vocab_size),
                "padded_vocab_size": int(model.padded_vocab_size),
                **{name: special_id(tokenizer, name) for name in ("bos_id", "eos_id", "pad_id")},
                "config": OmegaConf.to_container(model.cfg, resolve=True),
            }
        except BaseException as error:  # report every file; torch's CheckpointException is a BaseException
            if isinstance(error, KeyboardInterrupt):
                raise
            results[item["name"]] = {"error": traceback.format_exc()}
    torch.save(results, output_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
