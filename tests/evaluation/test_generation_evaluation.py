"""Held-out generation evaluation during training (trainer.<algorithm>.evaluation), checked against an independent
scorer, and what a run leaves: val/<metric> in every logger, evaluation.json, the summary, console.log, plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from examples.nlp.gpt.train_gpt_dpo import main as dpo_main
from examples.nlp.gpt.train_gpt_sft import main as sft_main
from examples.nlp.gpt.train_gpt_spin import main as spin_main
from nemo_aligner.evaluation import GenerationEvaluator, build_evaluator, format_table
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.config_validation import ConfigError
from tests.evaluation.common import EVALUATION, independent_exact_match, validation_prompts
from tests.functional.dpo_runs import FAST_DPO, dpo_config
from tests.functional.sft_runs import FAST_SFT, REPO, sft_config
from tests.functional.test_spin import FAST_SPIN, spin_config

EVALUATION_GREEDY = {
    "use_greedy": True,
    "temperature": 1.0,
    "top_k": 0,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "end_strings": ["<|endoftext|>", "<extra_id_1>"],
    "add_BOS": False,
    "all_probs": False,
    "compute_logprob": False,
}


@pytest.fixture(scope="module")
def sft_model(tiny_sft_model):
    return MegatronGPTModel.restore_from(tiny_sft_model).eval()


def upper_case(text: str) -> str:
    """A user normaliser for the test (``tests.evaluation.test_generation_evaluation:upper_case``)."""
    return text.upper()


def test_exact_match_equals_an_independent_scorer(sft_model):
    prompts = validation_prompts(sft_model.tokenizer)
    evaluator = build_evaluator(EVALUATION, prompts, sft_model.tokenizer, seed=1234)
    metrics = evaluator.evaluate(sft_model)

    expected = independent_exact_match(sft_model, prompts, EVALUATION["num_prompts"], EVALUATION["max_length"])
    assert metrics["exact_match"] == pytest.approx(expected, abs=1e-12)
    assert 0.0 < expected < 1.0  # the model gets some right and some wrong: the comparison can tell them apart
    assert 1.0 <= metrics["response_length"] <= EVALUATION["max_length"]
    assert 0.0 <= metrics["unfinished_fraction"] <= 1.0

    # A user normaliser applies to both sides (the same score here); one that maps everything alike scores 1.
    same = build_evaluator({**EVALUATION, "normalizer": f"{__name__}:upper_case"}, prompts, sft_model.tokenizer, 1)
    assert same.evaluate(sft_model)["exact_match"] == pytest.approx(expected, abs=1e-12)
    evaluator_all = GenerationEvaluator(evaluator.cfg, prompts, sft_model.tokenizer, 1)
    evaluator_all.normalize = lambda text: ""
    assert evaluator_all.evaluate(sft_model)["exact_match"] == 1.0


def test_the_judge_score_is_the_mean_of_valid_scores(sft_model):
    prompts = validation_prompts(sft_model.tokenizer)
    evaluator = build_evaluator({**EVALUATION, "num_prompts": 6}, prompts, sft_model.tokenizer, seed=1234)
    seen = {}

    def judge(prompt_ids, responses):  # a stand-in judge: the response length, none for index 0
        seen.update(responses)
        return {i: (None if i == 0 else float(len(r))) for i, r in responses.items()}

    metrics = evaluator.evaluate(sft_model, judge=judge)
    lengths = [len(seen[i]) for i in range(1, 6)]
    assert sorted(seen) == list(range(6))
    assert metrics["judge_score"] == pytest.approx(sum(lengths) / 5)
    assert metrics["judge_unparseable_fraction"] == pytest.approx(1 / 6)


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.sft.evaluation.normalizer=no_such_module:f", "trainer.sft.evaluation.normalizer"),
        ("trainer.sft.evaluation.num_prompts=0", "trainer.sft.evaluation.num_prompts"),
        ("trainer.sft.evaluation.metric=bleu", "trainer.sft.evaluation.metric"),
        ("trainer.sft.evaluation.sampling.top_k=-1", "trainer.sft.evaluation.sampling"),
    ],
)
def test_bad_evaluation_settings_are_refused_before_training(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        sft_main(sft_config(tmp_path, *FAST_SFT, override))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_an_sft_run_reports_its_evaluations(tmp_path, caplog):
    sft_main(sft_config(tmp_path, *FAST_SFT, "trainer.sft.evaluation.num_prompts=24"))

    report = json.loads((tmp_path / "evaluation.json").read_text())
    steps = [e["step"] for e in report["evaluations"]]
    assert steps == [0, 3, 6, 8] and report["num_prompts"] == 24
    assert [e["label"] for e in report["evaluations"]][0] == "start" and report["evaluations"][-1]["end"]
    # Every evaluation is logged as val/<metric> at its step (CSV; TensorBoard gets the same dict).
    logged = {int(r["step"]): r for r in read_csv(tmp_path / "csv" / "metrics.csv") if r.get("val/exact_match")}
    for entry in report["evaluations"]:
        for name, value in entry["metrics"].items():
            assert float(logged[entry["step"]][f"val/{name}"]) == pytest.approx(value, rel=1e-6)
    # The end of the run: the summary with the table and paths, kept in console.log; plots.
    summary = next(r.message for r in caplog.records if r.message.startswith("Run summary"))
    summary_lines = [line.strip() for line in summary.splitlines()]
    assert all(line.strip() in summary_lines for line in format_table(report).splitlines())
    assert "megatron_gpt_sft.nemo" in summary and "wall time" in summary
    assert "Run summary" in (tmp_path / "console.log").read_text()
    plots = json.loads((tmp_path / "plots" / "plots.json").read_text())
    assert [p for p in plots["panels"]["evaluation"]["series"]["val/exact_match"]["step"]] == steps


def test_spin_reports_the_start_and_each_iteration_and_the_table_command_prints_it(tmp_path, tiny_sft_model, caplog):
    spin_main(spin_config(tmp_path, tiny_sft_model, *FAST_SPIN, "trainer.spin.evaluation.num_prompts=24"))

    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert [(e["label"], e["step"]) for e in report["evaluations"]] == [
        ("start", 0),
        ("iteration 1", 3),
        ("iteration 2", 6),
    ]
    messages = [r.message for r in caplog.records]
    for text in ("Iteration 1/2: rollout started", "Iteration 2/2: rollout done", "Iteration 2/2 done at step 6"):
        assert any(text in m for m in messages), text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the tiny config's defaults warn of nothing
    # The README's last command prints the table from evaluation.json: the same numbers.
    printed = subprocess.run(
        [sys.executable, "-m", "nemo_aligner.evaluation", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert printed.returncode == 0, printed.stderr
    rows = printed.stdout.strip().splitlines()[2:]
    for row, entry in zip(rows, report["evaluations"], strict=True):
        assert float(row.split()[-3]) == pytest.approx(entry["metrics"]["exact_match"], abs=5e-5)


def test_dpo_scores_the_validation_prompts_against_the_chosen_responses(tmp_path, tiny_sft_model, sft_model):
    evaluation = ["trainer.dpo.evaluation.enabled=true", "trainer.dpo.evaluation.num_prompts=16"]
    dpo_main(dpo_config(tmp_path, tiny_sft_model, *FAST_DPO, *evaluation, "trainer.dpo.evaluation.max_length=24"))

    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert [(e["label"], e["step"]) for e in report["evaluations"]] == [("start", 0), ("step 3", 3)]
    # The start is the SFT model: scored by hand on the same prompts against the chosen responses of the file.
    from nemo_aligner.data import embedded

    with (embedded.EMBEDDED_DIR / "dpo_validation.jsonl").open() as f:
        lines = [json.loads(line) for line, _ in zip(f, range(16))]
    tokenizer = sft_model.tokenizer
    hits = 0
    for line in lines:
        prompt = tokenizer.text_to_ids(line["prompt"])
        output = sft_model.generate([prompt], EVALUATION_GREEDY, {"max_length": 24, "min_length": 0})
        text = tokenizer.ids_to_text(output.response_ids[0]).split("<extra_id_1>")[0]
        hits += text.strip() == line["chosen_response"].split("<extra_id_1>")[0].strip()
    assert report["evaluations"][0]["metrics"]["exact_match"] == pytest.approx(hits / 16)


def test_log_lines_land_on_their_own_line_while_the_progress_bar_is_drawn():
    import io
    import logging

    from tqdm import tqdm

    from nemo_aligner.utils.config import ProgressBarSafeHandler

    stream = io.StringIO()
    log = logging.getLogger("tests.progress_bar_safe")
    log.propagate = False
    log.addHandler(ProgressBarSafeHandler(stream))
    with tqdm(total=3, file=stream, desc="train") as bar:
        bar.update(1)
        log.warning("Saved checkpoint step=1")
        bar.update(1)
    assert "Saved checkpoint step=1" in stream.getvalue().replace("\r", "\n").splitlines()
