"""Docs do not rot: every ```bash command of README.md and docs/*.md runs (or, for installs, is checked) on the
embedded default, on the CPU, with the scale-down suffixes and path placeholders of docs/README.md."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from tests.docs.doc_commands import (
    EMBEDDED,
    REPO,
    DocRunner,
    check_pip_install,
    check_pytest,
    documented_placeholders,
    documents,
    fenced_blocks,
    scale_down_suffixes,
    split_commands,
)

ENTRY_SCRIPTS = sorted(p.name for p in (REPO / "examples" / "nlp" / "gpt").glob("*.py"))


@pytest.fixture(scope="session")
def tiny_hf_model_dir(tmp_path_factory) -> Path:
    """A tiny random Hugging Face Llama with its tokenizer, saved locally (what a user converts)."""
    from tests.checkpoint.test_hf_conversion import _tiny_hf_model, _tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny_hf_llama")
    _tiny_hf_model("llama").save_pretrained(directory)
    _tiny_tokenizer().save_pretrained(directory)
    return directory


class LazyFixtures:
    """Session fixtures fetched on first use (a page that needs no model builds none), with the time spent
    building them, so the doc-test's own time can be reported apart from the shared fixtures'."""

    def __init__(self, request) -> None:
        self.request = request
        self.seconds = 0.0

    def __call__(self, name: str) -> Path:
        start = time.monotonic()
        value = self.request.getfixturevalue(name)
        self.seconds += time.monotonic() - start
        return value


def placeholders(fixture: LazyFixtures, workspace: Path) -> dict:
    """docs/README.md's path placeholders -> what stands in for them."""

    def starting_model(script: str) -> str:
        judge = script == "train_gpt_self_rewarding.py"  # Self-Rewarding starts from a model that can judge
        return str(fixture("tiny_judge_model" if judge else "tiny_sft_model"))

    def hf_model_dir(_: str) -> str:
        copy = workspace / "hf_model_dir"
        if not copy.exists():
            shutil.copytree(fixture("tiny_hf_model_dir"), copy)
        return str(copy)

    return {
        "/path/to/nemo-aligner-repo": lambda _: str(REPO),
        "/path/to/mcore_gpt.nemo": lambda _: str(workspace / "mcore_gpt.nemo"),
        "/path/to/megatron_gpt_sft.nemo": starting_model,
        "/path/to/train_sft_format.jsonl": lambda _: str(EMBEDDED / "chat_train.jsonl"),
        "/path/to/valid_sft_format.jsonl": lambda _: str(EMBEDDED / "chat_validation.jsonl"),
        "/path/to/train_dpo_format.jsonl": lambda _: str(EMBEDDED / "dpo_train.jsonl"),
        "/path/to/valid_dpo_format.jsonl": lambda _: str(EMBEDDED / "dpo_validation.jsonl"),
        "/path/to/hf_model_dir": hf_model_dir,
        "HF_DIR": hf_model_dir,
        "/results": lambda _: "",  # a fresh directory per command (DocRunner.fresh_results)
    }


def test_the_index_documents_a_suffix_for_every_entry_script_and_every_placeholder(tmp_path):
    suffixes = scale_down_suffixes()
    assert set(ENTRY_SCRIPTS) <= set(suffixes), f"no scale-down suffix for {set(ENTRY_SCRIPTS) - set(suffixes)}"
    assert documented_placeholders() == set(placeholders(LazyFixtures(None), tmp_path))


def test_command_splitting_joins_continuations_and_drops_comments():
    block = 'export A="x y"\npython s.py \\\n   "k={a: [1]}" b=2  # note\nmkdir d && ls d; echo ok\n'
    assert split_commands(block) == [
        ["export", "A=x y"],
        ["python", "s.py", "k={a: [1]}", "b=2"],
        ["mkdir", "d"],
        ["ls", "d"],
        ["echo", "ok"],
    ]


@pytest.mark.parametrize(
    "args, problem",
    [
        (["install", "torch==2.0.0"], "CI installs torch"),
        (["install", "-e", ".[nonexistent]"], "no extra"),
        (["install", "left-pad"], "not a dependency"),
    ],
)
def test_install_checks_catch_wrong_pins_extras_and_packages(args, problem):
    with pytest.raises(AssertionError, match=problem):
        check_pip_install(args)


def test_pytest_checks_catch_unknown_markers_and_paths():
    check_pytest(["-q", "-m", "not slow and not gpu", "tests/losses"])
    with pytest.raises(AssertionError, match="unknown markers"):
        check_pytest(["-m", "fast"])
    with pytest.raises(AssertionError, match="no such test path"):
        check_pytest(["tests/nowhere.py"])


@pytest.mark.parametrize(
    "doc", [d for d in documents() if fenced_blocks(d, "python")], ids=lambda p: str(p.relative_to(REPO))
)
def test_python_blocks_compile(doc):
    for block in fenced_blocks(doc, "python"):
        compile(block, str(doc), "exec")


@pytest.mark.slow
@pytest.mark.parametrize(
    "doc", [d for d in documents() if fenced_blocks(d, "bash")], ids=lambda p: str(p.relative_to(REPO))
)
def test_documented_commands_run(doc, request, tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_ALIGNER_CACHE", str(tmp_path / "model_cache"))  # build_tiny_base_model.py's cache
    fixtures = LazyFixtures(request)
    runner = DocRunner(tmp_path, placeholders(fixtures, tmp_path), scale_down_suffixes())
    start = time.monotonic()
    for block in fenced_blocks(doc, "bash"):
        for command in split_commands(block):
            runner.run(command)
    # Past pytest's capture (capsys would swap sys.stderr, which the package's log handler keeps using).
    with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
        print(
            f"\n{doc.relative_to(REPO)}: {len(runner.ran)} commands run, {len(runner.checked)} checked "
            f"(installs, pytest, docker), {time.monotonic() - start - fixtures.seconds:.0f} s "
            f"(+ {fixtures.seconds:.0f} s building shared fixtures)"
        )
