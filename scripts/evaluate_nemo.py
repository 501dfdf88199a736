"""Sample from or evaluate any ``.nemo`` GPT model (greedy, KV-cached), outside a training run.

    # held-out exact match on the first 300 prompts of a chat / SFT jsonl (default: the embedded test set)
    python scripts/evaluate_nemo.py results/megatron_gpt_spin/checkpoints/megatron_gpt_spin.nemo --num-prompts 300
    # answers to your own prompts, rendered in the training chat template
    python scripts/evaluate_nemo.py MODEL.nemo --prompt "add 2 and 3" --prompt "sort 9 1 5"

``--config`` names the training config whose ``model.data`` (chat template, prompt template) renders prompts
(default ``examples/nlp/gpt/conf/gpt_sft_tiny.yaml``, the embedded default); it is loaded with
:func:`nemo_aligner.utils.config.load_config`, which, unlike ``OmegaConf.load``, resolves ``${embedded_data:...}``.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "examples" / "nlp" / "gpt" / "conf" / "gpt_sft_tiny.yaml"
DEFAULT_DATA = REPO / "nemo_aligner" / "data" / "embedded" / "chat_test.jsonl"


def answer(model, data_cfg, prompts: list[str], max_length: int) -> list[dict[str, str]]:
    """Greedy answers to user prompts, each rendered as one user turn of the data config's chat template."""
    from nemo_aligner.data.nlp.chat import ChatPromptTokens, ChatTemplate
    from nemo_aligner.evaluation import DEFAULT_END_STRINGS, generate_responses, greedy_sampling_params, response_text

    template = ChatTemplate(
        model.tokenizer, ChatPromptTokens.from_config(data_cfg.chat_prompt_tokens), max_seq_length=10**9
    )
    rendered = [
        template.prompt_and_answer(
            {"system": "", "conversations": [{"from": "User", "value": text}, {"from": "Assistant", "value": ""}]}
        )[0]
        for text in prompts
    ]
    sampling = greedy_sampling_params(DEFAULT_END_STRINGS)
    responses = generate_responses(model, rendered, sampling, max_length, batch_size=64)
    return [
        {"prompt": text, "answer": response_text(ids, model.tokenizer, DEFAULT_END_STRINGS)}
        for text, (ids, _) in zip(prompts, responses)
    ]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a .nemo file")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="chat / SFT jsonl with reference answers")
    parser.add_argument("--num-prompts", type=int, default=None, help="the first N prompts (default: all)")
    parser.add_argument("--max-length", type=int, default=24, help="new tokens per answer")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config for model.data")
    parser.add_argument("--prompt", action="append", help="answer this user prompt instead (repeatable)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        raise SystemExit(f"evaluate_nemo: error: {args.model}: no such .nemo file")

    from nemo_aligner.evaluation import exact_match_accuracy
    from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
    from nemo_aligner.utils.config import load_config
    from nemo_aligner.utils.distributed import initialize_distributed

    data_cfg = load_config(args.config).model.data
    initialize_distributed()  # this one-process tool is its own launcher: megatron-core's parallel state first
    model = MegatronGPTModel.restore_from(args.model).eval()
    if args.prompt:
        result = {"model": str(args.model), "answers": answer(model, data_cfg, args.prompt, args.max_length)}
    else:
        accuracy = exact_match_accuracy(
            model, str(args.data), data_cfg, max_samples=args.num_prompts, max_new_tokens=args.max_length
        )
        result = {"model": str(args.model), "data": str(args.data), **accuracy}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
