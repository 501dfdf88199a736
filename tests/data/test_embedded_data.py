"""Bundled embedded-default data: reproducible, disjoint splits, correct answers, exact templates, documented sizes.

Answers and judge scores are recomputed here with code independent of the generator and of
``nemo_aligner.data.embedded`` (string splitting instead of regexes, a dynamic-programming edit distance).
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import nemo_aligner.data.embedded as embedded

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_embedded_data.py"
DATA = embedded.EMBEDDED_DIR
SPLITS = ("train", "validation", "test")
SPLIT_SIZES = {"train": 3000, "validation": 300, "test": 300}
JUDGE_SIZES = {"train": 1500, "validation": 300}
PROMPT = "<extra_id_0>System\n\n<extra_id_1>User\n{}\n<extra_id_1>Assistant\n"
END = "\n<extra_id_1>"
NUMERIC = {"add", "sub", "max", "count"}


def load(name: str) -> list[dict]:
    with (DATA / name).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def solve(prompt: str) -> str:
    """The answer to ``prompt``, computed independently of the library."""
    words = prompt.split(" ")
    if words[0] == "add":
        return str(int(words[1]) + int(words[3]))
    if words[0] == "subtract":
        return str(int(words[3]) - int(words[1]))
    if prompt.startswith("max of "):
        return str(max(int(n) for n in prompt[len("max of ") :].split(",")))
    if words[0] == "sort":
        return " ".join(sorted(words[1:], key=int))
    if words[0] == "reverse:":
        return "".join(reversed(words[1]))
    if words[0] == "count":
        return str(sum(ch == words[3] for ch in words[5]))
    if words[0] == "uppercase:":
        return "".join(chr(ord(ch) - 32) for ch in words[1])
    raise AssertionError(f"unknown prompt {prompt!r}")


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: substitutions, insertions, deletions and adjacent swaps."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def expected_score(task: str, answer: str, response: str) -> int:
    """The documented judge rubric (README table), written from the table."""
    if response == answer:
        return 5
    if task in NUMERIC:
        if not response.lstrip("-").isdigit():
            return 0
        distance = abs(int(response) - int(answer))
        return 2 if distance == 1 else 1 if distance <= 10 else 0
    r, a = response.replace(" ", ""), answer.replace(" ", "")
    if edit_distance(r, a) <= 1:
        return 2
    return 1 if sorted(r) == sorted(a) or r.lower() == a.lower() else 0


def test_regenerating_reproduces_the_committed_files(tmp_path):
    spec = importlib.util.spec_from_file_location("make_embedded_data", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    counts = script.main(["--output_dir", str(tmp_path)])
    committed = sorted(p.name for p in DATA.glob("*.jsonl"))
    assert sorted(counts) == committed == sorted(p.name for p in tmp_path.iterdir())
    for name in committed:
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_template_constants_match_the_chat_template():
    assert embedded.PROMPT_TEMPLATE.format(prompt="x") == PROMPT.format("x")
    assert embedded.RESPONSE_TEMPLATE.format(answer="7") == "7" + END == embedded.format_response("7")
    assert embedded.END_OF_TURN == END
    tokens = embedded.CHAT_PROMPT_TOKENS
    rendered = (  # NeMo's chat rendering: header, then turn_start + name + end_of_name + value + end_of_turn
        f"{tokens['system_turn_start']}System{tokens['end_of_name']}{tokens['end_of_turn']}"
        f"{tokens['turn_start']}User{tokens['end_of_name']}x{tokens['end_of_turn']}"
        f"{tokens['turn_start']}Assistant{tokens['end_of_name']}7{tokens['end_of_turn']}{tokens['turn_start']}"
    )
    assert rendered == PROMPT.format("x") + "7" + END
    sft = embedded.SFT_PROMPT_TEMPLATE.format(input="x", output="7")
    assert sft == PROMPT.format("x") + "7" and embedded.SFT_PROMPT_TEMPLATE.endswith("{output}")


def test_splits_are_disjoint_and_formats_hold_the_same_samples():
    prompts = {}
    for split in SPLITS:
        sft, chat, dpo = load(f"sft_{split}.jsonl"), load(f"chat_{split}.jsonl"), load(f"dpo_{split}.jsonl")
        assert len(sft) == len(chat) == len(dpo) == SPLIT_SIZES[split]
        prompts[split] = [r["input"] for r in sft]
        assert len(set(prompts[split])) == len(sft), f"duplicate prompts in {split}"
        for s, c, d in zip(sft, chat, dpo):
            assert s["id"] == c["id"] == d["id"] and s["task"] == c["task"] == d["task"]
            assert c["system"] == "" and c["mask"] == "User"
            assert c["conversations"] == [
                {"from": "User", "value": s["input"]},
                {"from": "Assistant", "value": s["output"]},
            ]
            assert d["prompt"] == PROMPT.format(s["input"]) and d["chosen_response"] == s["output"] + END
    assert not set(prompts["train"]) & set(prompts["validation"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["validation"]) & set(prompts["test"])


def test_every_answer_is_correct_and_tasks_are_balanced():
    for split in SPLITS:
        rows = load(f"sft_{split}.jsonl")
        per_task = {task: 0 for task in embedded.TASKS}
        for row in rows:
            assert row["output"] == solve(row["input"]), row
            assert embedded.answer_for(row["task"], row["input"]) == row["output"]
            assert embedded.task_of(row["input"]) == row["task"]
            assert len(row["input"]) <= 60 and len(row["output"]) <= 12
            per_task[row["task"]] += 1
        assert max(per_task.values()) - min(per_task.values()) <= 1, (split, per_task)


def test_rejected_responses_are_wrong_and_templated():
    prefix, suffix = PROMPT.split("{}")
    for split in SPLITS:
        rows = load(f"dpo_{split}.jsonl")
        for row in rows:
            assert row["prompt"].startswith(prefix) and row["prompt"].endswith(suffix)
            question = row["prompt"][len(prefix) : -len(suffix)]
            assert row["prompt"] == PROMPT.format(question) and "\n" not in question
            assert row["chosen_response"] == solve(question) + END
            assert row["rejected_response"].endswith(END) and row["rejected_response"].count("<extra_id_1>") == 1
            rejected = row["rejected_response"][: -len(END)]
            assert rejected and rejected != solve(question), row
        assert len({r["rejected_response"] for r in rows}) > len(rows) // 4, "rejected answers lack diversity"


def test_judge_scores_follow_correctness():
    for split, size in JUDGE_SIZES.items():
        rows = load(f"judge_{split}.jsonl")
        split_prompts = {r["input"] for r in load(f"sft_{split}.jsonl")}
        assert len(rows) == size
        scores = [r["score"] for r in rows]
        assert 0.45 <= sum(r["correct"] for r in rows) / size <= 0.55
        assert set(scores) == {0, 1, 2, 5}
        for row in rows:
            assert row["prompt"] in split_prompts
            answer = solve(row["prompt"])
            assert row["correct"] == (row["response"] == answer)
            assert row["score"] == expected_score(row["task"], answer, row["response"]), row
            assert row["score"] == embedded.judge_score(row["task"], answer, row["response"])
            assert row["judgement"] == f"Expected {answer}, got {row['response']}. Score: {row['score']}"
            assert re.search(r"(?i)(?:Score|Points): (\d+)", row["judgement"]).group(1) == str(row["score"])


def test_exact_match_and_judge_prompt():
    assert embedded.exact_match(" 19\n", "19") and embedded.exact_match("19\n<extra_id_1>", "19")
    assert not embedded.exact_match("190", "19") and not embedded.exact_match("1 9", "19")
    assert embedded.judge_score("add", "19", "20") == 2 and embedded.judge_score("upper", "ABC", "abc") == 1
    with pytest.raises(ValueError, match="not a well-formed 'add'"):
        embedded.answer_for("add", "reverse: plane")
    assert embedded.render_judge_prompt("add 1 and 2", "3") == "Rate the answer.\nQuestion: add 1 and 2\nAnswer: 3"


def test_sizes_match_the_readme():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    table = {
        m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^\| `(\w+\.jsonl)` \| (\d+) \| (\d+) \|", readme, re.M)
    }
    files = sorted(DATA.glob("*.jsonl"))
    assert sorted(table) == [p.name for p in files]
    total = 0
    for path in files:
        data = path.read_bytes()
        assert table[path.name] == (data.count(b"\n"), len(data)), path.name
        total += len(data)
    assert f"Total: {sum(lines for lines, _ in table.values())} lines, {total} bytes." in readme
    assert total < 3_100_000
