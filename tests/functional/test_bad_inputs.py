"""The bad-input corpus (tests/bad_inputs/cases.yaml): every broken input fails its entry script with the error the
manifest names, before any model is built or checkpoint loaded, and leaves the existing results directory as it was."""

from __future__ import annotations

import hashlib
import importlib
import io
import shutil
import tarfile
from pathlib import Path
from string import Template

import pytest
import yaml
from omegaconf import OmegaConf

from nemo_aligner.checkpoint import nemo_file, trainer_checkpoint
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.config import compose_config
from tests.conftest import NEMO_FIXTURES
from tests.functional.sft_runs import REPO, SCRIPTS

CORPUS = REPO / "tests" / "bad_inputs"
MANIFEST = yaml.safe_load((CORPUS / "cases.yaml").read_text())
CASES = MANIFEST["cases"]


class ModelReached(BaseException):
    """Raised by the patched model constructors and checkpoint loader; a BaseException so no handler swallows it."""


def repack(source: Path, dest: Path, **config_changes) -> Path:
    """A copy of a `.nemo` with some `model_config.yaml` keys changed (weights untouched)."""
    with nemo_file.open_nemo(source) as unpacked:
        cfg = nemo_file.read_model_config(unpacked)
        for key, value in config_changes.items():
            cfg[key] = value
        (unpacked / nemo_file.MODEL_CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
        with tarfile.open(dest, "w:") as tar:
            tar.add(unpacked, arcname=".")
    return dest


@pytest.fixture(scope="module")
def corpus_files(tmp_path_factory) -> dict[str, str]:
    """The placeholders of the manifest: checkpoints derived from a NeMo-written fixture."""
    root = tmp_path_factory.mktemp("bad_input_checkpoints")
    fixture = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    base = repack(fixture, root / "base.nemo", encoder_seq_length=256, max_position_embeddings=256)
    mixed = repack(fixture, root / "mixed.nemo", encoder_seq_length=256, max_position_embeddings=256, num_layers=4)
    truncated = root / "truncated.nemo"
    truncated.write_bytes(base.read_bytes()[: int(base.stat().st_size * 0.6)])
    context = {"encoder_seq_length": 256, "max_position_embeddings": 256}
    absolute = repack(fixture, root / "abs_tokenizer.nemo", **context, tokenizer=_tokenizer("/etc/hostname"))
    escaping = repack(fixture, root / "escaping_tokenizer.nemo", **context, tokenizer=_tokenizer("nemo:../../x.model"))
    long_name = root / "long_member_name.nemo"
    shutil.copyfile(base, long_name)
    with tarfile.open(long_name, "a:") as tar:  # a member name longer than file systems allow (255 bytes)
        info = tarfile.TarInfo("./" + "n" * 300)
        tar.addfile(info, io.BytesIO(b""))
    return {
        "data": str(CORPUS / "data"),
        "base_nemo": str(base),
        "mixed_nemo": str(mixed),
        "truncated_nemo": str(truncated),
        "abs_tokenizer_nemo": str(absolute),
        "escaping_tokenizer_nemo": str(escaping),
        "long_member_nemo": str(long_name),
    }


def _tokenizer(model: str) -> dict:
    return {"library": "sentencepiece", "model": model}


def prepare_results(kind: str | None, results: Path, request) -> None:
    """An existing run's results: a metrics file and, when asked, a trainer checkpoint with a cut shard file."""
    (results / "checkpoints").mkdir(parents=True)
    (results / "metrics.csv").write_text("step,loss\n1,0.5\n")
    if kind is None:
        return
    if kind not in ("truncated_trainer_checkpoint", "sft_trainer_checkpoint", "zero_byte_rng_checkpoint"):
        raise ValueError(f"unknown results kind {kind!r}")
    complete = request.getfixturevalue("one_step_sft_checkpoint")
    copy = results / "checkpoints" / complete.name
    shutil.copytree(complete, copy)
    if kind == "truncated_trainer_checkpoint":
        shard = max((copy / trainer_checkpoint.STATE_DIR).glob("*.distcp"), key=lambda p: p.stat().st_size)
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    elif kind == "zero_byte_rng_checkpoint":
        (copy / trainer_checkpoint.RNG_DIR / "rank_0.pt").write_bytes(b"")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def forbid_models(monkeypatch) -> None:
    """From here on, building a model (fresh or restored) or loading a trainer checkpoint raises ModelReached."""

    def reached(*args, **kwargs):
        raise ModelReached("a model was built or a checkpoint loaded before the error")

    monkeypatch.setattr(MegatronGPTModel, "__init__", reached)
    monkeypatch.setattr(MegatronGPTModel, "restore_from", classmethod(reached))
    monkeypatch.setattr(trainer_checkpoint, "load_checkpoint", reached)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_fails_early_with_its_error(case, corpus_files, tmp_path, monkeypatch, request):
    script = MANIFEST["scripts"][case["script"]]
    results = tmp_path / "results"
    prepare_results(case.get("results"), results, request)
    before = snapshot(results)
    values = {**corpus_files, "results": str(results)}
    overrides = [Template(o).substitute(values) for o in script["overrides"] + case["overrides"]]
    main = importlib.import_module(f"examples.nlp.gpt.{script['module']}").main
    forbid_models(monkeypatch)

    with pytest.raises(Exception) as info:
        main(compose_config(SCRIPTS / "conf", script["config"], overrides))

    assert type(info.value).__name__ == case["error"], f"{type(info.value).__name__}: {info.value}"
    for part in case["message"]:
        assert part in str(info.value), f"{part!r} not in: {info.value}"
    assert snapshot(results) == before


def test_every_corpus_file_is_used():
    used = " ".join(" ".join(case["overrides"]) for case in CASES) + " ".join(
        " ".join(s["overrides"]) for s in MANIFEST["scripts"].values()
    )
    unused = [p.name for p in (CORPUS / "data").iterdir() if p.name not in used]
    assert not unused
