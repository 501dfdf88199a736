"""What the held-out evaluation tests share: the embedded validation prompts and an independent scorer."""

from __future__ import annotations

import json

from nemo_aligner.data import embedded
from nemo_aligner.data.nlp.builders import build_sft_dataset

VALIDATION_FILE = embedded.EMBEDDED_DIR / "chat_validation.jsonl"
DATA_CFG = {"chat": True, "chat_prompt_tokens": embedded.CHAT_PROMPT_TOKENS}
SPLIT_CFG = {"file_path": str(VALIDATION_FILE), "max_seq_length": 128, "add_eos": False, "label_key": "output"}
EVALUATION = {"enabled": True, "num_prompts": 40, "max_length": 24, "batch_size": 16, "metric": "exact_match"}
END = "<extra_id_1>"


def validation_prompts(tokenizer):
    """The embedded validation set as the SFT recipe builds it (prompts rendered in the chat template)."""
    return build_sft_dataset(DATA_CFG, SPLIT_CFG, tokenizer, seed=1234)


def reference_answers(count: int) -> list[str]:
    """The assistant turns of the first ``count`` jsonl lines, read straight from the file."""
    with VALIDATION_FILE.open() as f:
        lines = [json.loads(line) for line, _ in zip(f, range(count))]
    return [line["conversations"][-1]["value"] for line in lines]


def independent_exact_match(model, prompts, count: int, max_length: int) -> float:
    """Greedy answers one prompt at a time with plain ``model.generate``, compared as strings with the file's
    answers (decoded text up to the end-of-turn marker, whitespace stripped)."""
    params = {
        "use_greedy": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "repetition_penalty": 1.0,
        "end_strings": ["<|endoftext|>", END],
        "add_BOS": False,
        "all_probs": False,
        "compute_logprob": False,
    }
    hits = 0
    for i, answer in enumerate(reference_answers(count)):
        prompt = list(prompts.prompt_and_answer(i)[0])
        output = model.generate([prompt], params, {"max_length": max_length, "min_length": 0})
        text = model.tokenizer.ids_to_text(output.response_ids[0]).split(END)[0]
        hits += text.strip() == answer.strip()
    return hits / count
