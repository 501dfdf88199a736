"""Write the bundled synthetic "embedded default" data (``nemo_aligner/data/embedded/*.jsonl``).

Usage::

    python scripts/make_embedded_data.py [--output_dir nemo_aligner/data/embedded] [--seed 1234]

Seven short exact-answer tasks (``nemo_aligner.data.embedded.TASKS``), balanced per split, with train, validation
and test (held-out) prompts disjoint. Every sample is written in four formats: ``sft_*`` (NeMo SFT
``input``/``output``), ``chat_*`` (NeMo chat ``conversations``), ``dpo_*`` (templated prompt, the correct answer as
chosen and a plausible wrong one as rejected) and, for train and validation, ``judge_*`` (a candidate answer, half
of them wrong, with its ground-truth score and a short judgement for Self-Rewarding's judge) and ``chat_judge_*``
(the same judge samples as chat conversations, each followed by a meta-judge comparison of the right judgement with
a wrong one; mixed into the SFT data of the Self-Rewarding starting model so that it can judge).

The output is a pure function of the arguments: all randomness comes from ``random.Random`` seeded with ints and
strings (stable across Python versions), lists are never built by iterating over sets, and every answer is checked
against ``answer_for``, which recomputes it from the prompt text.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from nemo_aligner.data.embedded import (
    EMBEDDED_DIR,
    JUDGE_SCORE_HIGH,
    JUDGE_SCORES,
    TASKS,
    answer_for,
    format_prompt,
    format_response,
    judge_score,
    judgement_for,
    meta_verdict_for,
    render_judge_prompt,
    render_meta_judge_prompt,
)

logger = logging.getLogger(__name__)

# Common short words; half of the words in word tasks are these, half pronounceable made-up words (unbounded supply).
REAL_WORDS = """
able acid aged also area army away baby back ball band bank base bath bear beat bell belt best bird blue boat body
bone book boot born boss both bowl burn busy cake call calm camp card care cart case cash cast cell chat chip city
clay club coal coat code cold cook cool copy corn cost crew crop dark data date dawn deal dear deep desk diet dish
door down draw drop drum duck dust duty earn ease east easy edge else even ever face fact fair fall farm fast fear
feel file fill film find fine fire firm fish flag flat flow food foot fork form fort free frog fuel full fund gain
game gate gift girl glad goal gold golf good gray grow hair half hall hand hard harm hate head heat help hero hide
high hill hint hole home hope horn host hour huge idea iron item jazz join joke jump jury just keen keep kind king
kiss knee lake lamp land lane last late lazy lead leaf lean left lend life lift like line link lion list live load
loan lock long loop lord lose loud love luck mail main make mark mask mass meal meat menu mild milk mind mine miss
mode moon more most move much name navy near neck nest news next nice nose note open oven pace pack page pain pair
palm park part past path peak pick pile pine pink pipe plan play plot plus poem pole pool poor port post pull pure
push race rain rank rare rate read real rest rice rich ride ring rise risk road rock role roof room root rope rose
rule safe sail salt sand save seat seed sell ship shoe shop shot show sick side sign silk sing site size skin slow
snow soap sock soft soil song soon sort soup spot star stay step stop suit sure swim tail take talk tall tank tape
task team tell tent term test text thin tide time tiny tone tool tour town tree trip true tube tune turn twin type
unit used vast verb view vote wage wait wake walk wall warm wash wave weak wear week well west wide wife wild wind
wine wing wire wise wish wolf wood wool word work yard year zero zone
apple beach bread brick chair chalk cloud crane dance dream drink eagle earth field flame flour frost fruit glass
grape grass heart horse house juice knife lemon light mango maple metal money mouse music night ocean onion paint
paper party piano pilot plane plant plate queen radio river robot salad scarf sheep shelf shirt smile snake space
spoon stone storm sugar table tiger toast tooth towel train truck uncle voice water whale wheel world zebra
anchor basket bottle bridge button camera candle carpet castle cherry circle coffee cookie dragon garden ginger
guitar hammer island jacket kitten ladder letter magnet market mirror monkey needle orange pencil pepper pillow
planet pocket potato rabbit ribbon rocket saddle silver spider spring statue summer ticket tomato turtle velvet
violin walnut window winter wizard yellow
""".split()
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
MAX_ATTEMPTS = 10_000

# A task generator returns (prompt, answer, plausible wrong answers).
Sample = tuple[str, str, list[str]]


def _word(rng: random.Random) -> str:
    """A lowercase word: a common English word or a pronounceable made-up one (4 to 7 letters)."""
    if rng.random() < 0.5:
        return rng.choice(REAL_WORDS)
    syllables = [rng.choice(CONSONANTS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 3))]
    return "".join(syllables) + (rng.choice(CONSONANTS) if rng.random() < 0.5 else "")


def _distinct(candidates: Sequence[str], answer: str) -> list[str]:
    """Candidates without duplicates (first occurrence kept), blanks and the correct answer."""
    out: list[str] = []
    for candidate in candidates:
        if candidate and candidate != answer and candidate not in out:
            out.append(candidate)
    return out


def _number_misses(value: int, extra: Sequence[int]) -> list[str]:
    """Wrong numbers near ``value`` (off by one, off by ten, digits swapped) plus task-specific ones."""
    candidates = [value + 1, value - 1, value + 10, value - 10, *extra]
    if value >= 10:
        candidates.append(int(str(value)[::-1]))
    return [str(n) for n in candidates if n >= 0]


def _string_misses(rng: random.Random, answer: str, extra: Sequence[str]) -> list[str]:
    """Wrong strings near ``answer``: a letter dropped, doubled, or swapped with its neighbour; plus ``extra``."""
    i = rng.randrange(len(answer))
    j = rng.randrange(len(answer) - 1)
    return [
        *extra,
        answer[:i] + answer[i + 1 :],
        answer[:i] + answer[i] + answer[i:],
        answer[:j] + answer[j + 1] + answer[j] + answer[j + 2 :],
    ]


def _add(rng: random.Random) -> Sample:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"add {a} and {b}", str(a + b), _number_misses(a + b, [abs(a - b)])


def _sub(rng: random.Random) -> Sample:
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return f"subtract {b} from {a}", str(a - b), _number_misses(a - b, [a + b, a, b])


def _max(rng: random.Random) -> Sample:
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    top = max(numbers)
    others = sorted(n for n in numbers if n != top)
    extra = [others[-1], others[0]] if others else []
    return "max of " + ", ".join(map(str, numbers)), str(top), _number_misses(top, [*extra, numbers[0]])


def _sort(rng: random.Random) -> Sample:
    digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 6))]
    ordered = sorted(digits)
    i = rng.randrange(len(ordered))
    j = rng.randrange(len(ordered) - 1)
    misses = [
        digits,  # left unsorted
        ordered[::-1],  # sorted the wrong way
        ordered[:j] + [ordered[j + 1], ordered[j]] + ordered[j + 2 :],  # two neighbours swapped
        ordered[:i] + ordered[i + 1 :],  # a digit dropped
        ordered[:i] + [ordered[i]] + ordered[i:],  # a digit doubled
    ]
    return "sort " + " ".join(digits), " ".join(ordered), [" ".join(m) for m in misses]


def _reverse(rng: random.Random) -> Sample:
    word = _word(rng)
    answer = word[::-1]
    half = len(word) // 2
    partial = word[:half][::-1] + word[half:]  # only the first half reversed
    return f"reverse: {word}", answer, _string_misses(rng, answer, [word, partial, answer[1:] + answer[0]])


def _count(rng: random.Random) -> Sample:
    word = _word(rng)
    letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    count = word.count(letter)
    other = [word.count(c) for c in word if c != letter][:1]
    return f"count the letter {letter} in {word}", str(count), _number_misses(count, [*other, len(word)])


def _upper(rng: random.Random) -> Sample:
    word = _word(rng)
    answer = word.upper()
    i = rng.randrange(len(word))
    one_lower = answer[:i] + word[i] + answer[i + 1 :]
    return f"uppercase: {word}", answer, _string_misses(rng, answer, [word, word.capitalize(), one_lower])


GENERATORS: dict[str, Callable[[random.Random], Sample]] = {
    "add": _add,
    "sub": _sub,
    "max": _max,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
    "upper": _upper,
}


def make_split(name: str, size: int, rng: random.Random, seen: set[str]) -> list[dict]:
    """``size`` samples with prompts not in ``seen`` (which is updated), tasks balanced and shuffled.

    Each sample is ``{"id", "task", "prompt", "answer", "misses"}``; ``misses`` are plausible wrong answers.
    """
    tasks = [TASKS[i % len(TASKS)] for i in range(size)]
    rng.shuffle(tasks)
    width = max(4, len(str(size - 1)))
    samples = []
    for index, task in enumerate(tasks):
        for _ in range(MAX_ATTEMPTS):
            prompt, answer, misses = GENERATORS[task](rng)
            if prompt not in seen:
                break
        else:
            raise RuntimeError(f"Could not find a new {task!r} prompt for split {name!r}; lower the split sizes.")
        if answer_for(task, prompt) != answer:
            raise AssertionError(f"Generator and answer_for disagree on {prompt!r}: {answer!r}.")
        seen.add(prompt)
        misses = _distinct(misses, answer)
        assert misses, f"no wrong answer for {prompt!r}"
        samples.append(
            {"id": f"{name}-{index:0{width}d}", "task": task, "prompt": prompt, "answer": answer, "misses": misses}
        )
    return samples


def sft_record(sample: dict) -> dict:
    """NeMo SFT format; the config's ``prompt_template`` adds the chat markers."""
    return {"input": sample["prompt"], "output": sample["answer"], "task": sample["task"], "id": sample["id"]}


def chat_record(sample: dict) -> dict:
    """NeMo chat format, one user turn and the assistant's answer."""
    return {
        "system": "",
        "mask": "User",
        "conversations": [
            {"from": "User", "value": sample["prompt"]},
            {"from": "Assistant", "value": sample["answer"]},
        ],
        "task": sample["task"],
        "id": sample["id"],
    }


def dpo_record(sample: dict, rng: random.Random) -> dict:
    """Templated DPO pair: the correct answer is chosen, one of the plausible wrong answers rejected."""
    return {
        "prompt": format_prompt(sample["prompt"]),
        "chosen_response": format_response(sample["answer"]),
        "rejected_response": format_response(rng.choice(sample["misses"])),
        "task": sample["task"],
        "id": sample["id"],
    }


def judge_records(samples: Sequence[dict], size: int, rng: random.Random) -> list[dict]:
    """Judge targets for the first ``size`` samples: half correct answers, half wrong ones with balanced scores.

    A wrong candidate is one of the sample's plausible misses or another sample's answer (usually unrelated); the
    score level is drawn uniformly among the levels the candidates reach, so scores 0, 1 and 2 all appear.
    """
    if size > len(samples):
        raise ValueError(f"A judge split of {size} needs at least as many samples, got {len(samples)}.")
    correct = [i < size // 2 for i in range(size)]
    rng.shuffle(correct)
    records = []
    for sample, is_correct in zip(samples[:size], correct):
        if is_correct:
            response = sample["answer"]
        else:
            unrelated = samples[rng.randrange(len(samples))]["answer"]
            by_score: dict[int, list[str]] = {}
            for candidate in _distinct([*sample["misses"], unrelated], sample["answer"]):
                by_score.setdefault(judge_score(sample["task"], sample["answer"], candidate), []).append(candidate)
            response = rng.choice(by_score[rng.choice(sorted(by_score))])
        score = judge_score(sample["task"], sample["answer"], response)
        assert (score == JUDGE_SCORE_HIGH) == is_correct, f"score {score} for {response!r} on {sample['prompt']!r}"
        records.append(
            {
                "prompt": sample["prompt"],
                "response": response,
                "correct": is_correct,
                "score": score,
                "judgement": judgement_for(sample["answer"], response, score),
                "task": sample["task"],
                "id": sample["id"],
            }
        )
    return records


def judge_chat_records(judge: Sequence[dict], rng: random.Random) -> list[dict]:
    """Chat conversations teaching the judge and meta-judge roles: for every judge sample, the judge prompt answered
    with its judgement, then the meta-judge prompt comparing that judgement with a wrong one (a different score, in a
    random position) answered with the right one's letter. Both judgements expect the right answer, so the
    meta-judge learns to check that a score follows from the comparison the judgement makes."""
    records = []
    for row in judge:
        right = row["judgement"]
        expected = answer_for(row["task"], row["prompt"])
        wrong = judgement_for(expected, row["response"], rng.choice([s for s in JUDGE_SCORES if s != row["score"]]))
        winner = rng.choice("AB")
        a, b = (right, wrong) if winner == "A" else (wrong, right)
        turns = (
            ("judge", render_judge_prompt(row["prompt"], row["response"]), right),
            ("meta", render_meta_judge_prompt(row["prompt"], row["response"], a, b), meta_verdict_for(winner)),
        )
        for role, question, answer in turns:
            records.append(
                {
                    "system": "",
                    "mask": "User",
                    "conversations": [{"from": "User", "value": question}, {"from": "Assistant", "value": answer}],
                    "task": row["task"],
                    "id": f"{row['id']}-{role}",
                }
            )
    return records


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON object per line, UTF-8, ``\\n`` line ends."""
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=EMBEDDED_DIR, help="where the jsonl files go")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--validation_size", type=int, default=300)
    parser.add_argument("--test_size", type=int, default=300, help="held-out prompts")
    parser.add_argument("--judge_train_size", type=int, default=1500, help="judge samples from train prompts")
    parser.add_argument("--judge_validation_size", type=int, default=300, help="judge samples from validation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, int]:
    """Write all files; returns the number of lines per file name."""
    args = parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    # Held-out splits first, so their prompts do not change when the train size does.
    splits = {}
    for name in ("test", "validation", "train"):
        size = getattr(args, f"{name}_size")
        splits[name] = make_split(name, size, random.Random(f"{args.seed}/{name}"), seen)
    files: dict[str, list[dict]] = {}
    for name in ("train", "validation", "test"):
        samples = splits[name]
        files[f"sft_{name}.jsonl"] = [sft_record(s) for s in samples]
        files[f"chat_{name}.jsonl"] = [chat_record(s) for s in samples]
        dpo_rng = random.Random(f"{args.seed}/dpo/{name}")
        files[f"dpo_{name}.jsonl"] = [dpo_record(s, dpo_rng) for s in samples]
    for name in ("train", "validation"):
        judge_rng = random.Random(f"{args.seed}/judge/{name}")
        size = getattr(args, f"judge_{name}_size")
        files[f"judge_{name}.jsonl"] = judge_records(splits[name], size, judge_rng)
        chat_rng = random.Random(f"{args.seed}/chat_judge/{name}")
        files[f"chat_judge_{name}.jsonl"] = judge_chat_records(files[f"judge_{name}.jsonl"], chat_rng)
    for file_name, records in files.items():
        write_jsonl(args.output_dir / file_name, records)
    counts = {file_name: len(records) for file_name, records in files.items()}
    total = sum((args.output_dir / f).stat().st_size for f in files)
    logger.info("Wrote %d files (%d lines, %d bytes) to %s", len(files), sum(counts.values()), total, args.output_dir)
    return counts


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
