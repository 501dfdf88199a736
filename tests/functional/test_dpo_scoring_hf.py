"""The scoring tool's summed response log-probs equal transformers' on the same weights and token ids."""

from __future__ import annotations

import json

import torch

from examples.nlp.gpt.compute_reference_logprobs import main as score_main
from nemo_aligner.utils.config import compose_config
from tests.checkpoint.test_hf_conversion import _load_script, _tiny_hf_model, _tiny_tokenizer
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import SCRIPTS

PAIRS = [
    ("w5 w7 w9", " w11 w12", " w13"),
    ("w20 w21", " w22 w23 w24 w25", " w26 w27"),
    ("w30", " w31", " w32 w33 w34"),
    ("w40 w41 w42 w43 w44", " w45", " w46"),
]


def test_scoring_tool_matches_transformers(tmp_path):
    hf_model = _tiny_hf_model("llama")
    hf_dir, nemo_path = tmp_path / "hf", tmp_path / "tiny.nemo"
    hf_model.save_pretrained(hf_dir)
    _tiny_tokenizer().save_pretrained(hf_dir)
    _load_script("convert_llama_hf_to_nemo").main(
        ["--input_name_or_path", str(hf_dir), "--output_path", str(nemo_path)]
    )
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": p, "chosen_response": c, "rejected_response": r}) + "\n" for p, c, r in PAIRS)
    )
    out = tmp_path / "scored.jsonl"
    score_main(
        compose_config(
            SCRIPTS / "conf",
            "compute_reference_logprobs",
            [
                f"pretrained_checkpoint.restore_from_path={nemo_path}",
                f"data_path={data}",
                f"output_path={out}",
                "emit_token_ids=true",
                "model.dpo.log_prob_forward_micro_batch_size=2",
                *FP32,
            ],
        )
    )
    scored = [json.loads(line) for line in open(out)]
    assert len(scored) == len(PAIRS)
    worst = 0.0
    for line in scored:
        for side in ("chosen", "rejected"):
            ids = torch.tensor([line[f"{side}_token_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(hf_model(ids).logits.double(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
            expected = logp[line["prompt_num_tokens"] - 1 :].sum().item()
            assert line[f"{side}_num_tokens"] == ids.shape[1] - line["prompt_num_tokens"]
            worst = max(worst, abs(line[f"{side}_logp"] - expected))
    print(f"max |our - transformers| summed response log-prob: {worst:.2e}")
    assert worst < 2e-4
