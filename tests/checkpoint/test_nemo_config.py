"""The config and tokenizer we write into a `.nemo` follow NeMo's conventions (`checkpoint/nemo_config.py`), we
still read it back the same way, and a tokenizer NeMo would rebuild differently is never written silently.

The expectations come from NeMo 2.5.0's own files and code: the NeMo-written fixtures' `model_config.yaml`
(`tests/fixtures/nemo/`) and what `MegatronGPTModel.restore_from` needs on a CPU; `tests/interop/` checks the
same files against real NeMo.
"""

from __future__ import annotations

import json
import logging
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from nemo_aligner.checkpoint import nemo_file
from nemo_aligner.checkpoint.nemo_config import NEMO_GPT_TARGET, PLACEHOLDER_OPTIM
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.tokenizers import NemoTokenizerWarning
from tests.conftest import NEMO_FIXTURES, perturb_, tiny_model_cfg

TEXT = "the lazy dog <|eot_id|> 12345 héllo"


def written_config(path: Path) -> dict:
    with nemo_file.open_nemo(path, with_weights=False) as unpacked:
        return yaml.safe_load((unpacked / nemo_file.MODEL_CONFIG_FILE).read_text())


def save(model: MegatronGPTModel, path: Path) -> list[str]:
    """Save and return the NemoTokenizerWarning messages."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NemoTokenizerWarning)
        model.save_to(path)
    return [str(w.message) for w in caught if issubclass(w.category, NemoTokenizerWarning)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A Hub-style tokenizer directory: tokenizer.json plus a transformers 4 tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory = tmp_path_factory.mktemp("hf_tokenizer")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(["the lazy dog reads the old book"] * 10, trainer)
    backend.add_special_tokens(["<|eot_id|>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_written_config_has_the_keys_nemo_needs_and_keeps_ours(tmp_path):
    fixture = yaml.safe_load((NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.model_config.yaml").read_text())
    cfg = tiny_model_cfg(tokenizer={"library": "byte-level"}, dpo={"beta": 0.1})
    cfg.pop("mcore_gpt")
    assert save(MegatronGPTModel(cfg), tmp_path / "m.nemo") == []
    written = written_config(tmp_path / "m.nemo")
    # The values NeMo itself wrote for a CPU-built, fp32 megatron-core GPT with the local layer spec.
    for key in ("mcore_gpt", "use_cpu_initialization", "attention_backend", "target"):
        assert written[key] == fixture[key], key
    assert written["target"] == NEMO_GPT_TARGET
    assert written["optim"] == PLACEHOLDER_OPTIM
    assert written["dpo"] == {"beta": 0.1} and written["tokenizer"]["library"] == "byte-level"
    # NeMo writes every tokenizer key, unused ones as null.
    assert set(fixture["tokenizer"]) <= set(written["tokenizer"])


def test_a_runs_own_values_are_kept(tmp_path):
    optim = {"name": "adamw", "lr": 3e-3}
    cfg = tiny_model_cfg(optim=optim, use_cpu_initialization=False, target="nemo_aligner.SomeModel")
    save(MegatronGPTModel(cfg), tmp_path / "m.nemo")
    written = written_config(tmp_path / "m.nemo")
    assert (written["optim"], written["use_cpu_initialization"], written["target"]) == (
        optim,
        False,
        "nemo_aligner.SomeModel",
    )


def test_sentencepiece_legacy_is_written_explicitly(tmp_path):
    """NeMo's default for a missing sentencepiece_legacy is legacy mode, ours is not: the file says which."""
    model = MegatronGPTModel.restore_from(NEMO_FIXTURES / "tiny_gpt_ln_gelu_abs.nemo")
    del model.cfg.tokenizer["sentencepiece_legacy"]
    assert save(model, tmp_path / "m.nemo") == []
    tokenizer = written_config(tmp_path / "m.nemo")["tokenizer"]
    assert tokenizer["sentencepiece_legacy"] is False and tokenizer["model"].startswith("nemo:")


def test_hf_tokenizer_directory_stays_in_type_and_travels_as_an_artifact(tmp_path, hf_dir):
    """NeMo builds the tokenizer from `type` (a directory); the .nemo also carries tokenizer.json, which is what
    we read back: the directory named in `type` is never opened (here it is broken after saving)."""
    local = tmp_path / "tokenizer_dir"
    shutil.copytree(hf_dir, local)
    tokenizer_cfg = {"library": "huggingface", "type": str(local), "use_fast": True, "special_tokens": ["<|eot_id|>"]}
    model = MegatronGPTModel(tiny_model_cfg(tokenizer=tokenizer_cfg))
    perturb_(model)
    assert save(model, tmp_path / "m.nemo") == []
    written = written_config(tmp_path / "m.nemo")["tokenizer"]
    assert written["type"] == str(local.resolve()) and written["model"].startswith("nemo:")
    assert written["model"].endswith("_tokenizer.json") and written["eos_token"] == "</s>"
    assert written["special_tokens"] == {"additional_special_tokens": ["<|eot_id|>"]}  # NeMo's keyword form
    (local / "tokenizer.json").write_text("not a tokenizer")
    restored = MegatronGPTModel.restore_from(tmp_path / "m.nemo")
    assert restored.tokenizer.text_to_ids(TEXT) == model.tokenizer.text_to_ids(TEXT)
    assert restored.tokenizer.eos_id == model.tokenizer.eos_id
    ids = torch.tensor([model.tokenizer.text_to_ids(TEXT)])
    with torch.no_grad():
        assert torch.equal(restored.eval()(ids), model.eval()(ids))


def test_hf_tokenizer_without_a_directory_warns(tmp_path, hf_dir):
    """A bare tokenizer.json: NeMo 2.5 cannot build it from inside the .nemo, so saving warns (and still writes a
    file this library reads)."""
    model = MegatronGPTModel(
        tiny_model_cfg(tokenizer={"library": "huggingface", "type": str(hf_dir / "tokenizer.json")})
    )
    (message,) = save(model, tmp_path / "m.nemo")
    assert "tokenizer.type" in message and "NeMo cannot restore it" in message
    written = written_config(tmp_path / "m.nemo")["tokenizer"]
    assert written["type"] is None and written["model"].endswith("_tokenizer.json")
    restored = MegatronGPTModel.restore_from(tmp_path / "m.nemo")
    assert restored.tokenizer.text_to_ids(TEXT) == model.tokenizer.text_to_ids(TEXT)


def test_hf_tokenizer_saved_by_transformers_5_warns(tmp_path, hf_dir):
    local = tmp_path / "saved_by_transformers_5"
    shutil.copytree(hf_dir, local)
    config = json.loads((local / "tokenizer_config.json").read_text())
    (local / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "TokenizersBackend"}))
    model = MegatronGPTModel(tiny_model_cfg(tokenizer={"library": "huggingface", "type": str(local)}))
    (message,) = save(model, tmp_path / "m.nemo")
    assert "TokenizersBackend" in message and "transformers 4" in message


@pytest.mark.parametrize("special_tokens", [None, ["<extra_id_0>", "<extra_id_1>"]])
def test_byte_level_notes_special_tokens_in_the_log_without_a_warning(tmp_path, caplog, special_tokens):
    """NeMo's byte-level tokenizer reserves the special ids but encodes their strings as bytes: the same model
    (ids, logits) in NeMo, so a logged note rather than a warning (the embedded default's runs do not warn)."""
    tokenizer = {"library": "byte-level", "special_tokens": special_tokens}
    with caplog.at_level(logging.INFO, logger="nemo_aligner.tokenizers"):
        warned = save(MegatronGPTModel(tiny_model_cfg(tokenizer=tokenizer)), tmp_path / "m.nemo")
    notes = [r.getMessage() for r in caplog.records if r.name == "nemo_aligner.tokenizers"]
    assert warned == []
    if special_tokens is None:
        assert notes == []
    else:
        (note,) = notes
        assert "tokenizer.special_tokens" in note and "<extra_id_1>" in note and "plain bytes" in note


@pytest.mark.parametrize("named", [False, True])
def test_sentencepiece_legacy_warns_without_a_named_eos(tmp_path, named):
    """NeMo's legacy SentencePiece tokenizer finds bos/eos/pad only by name (its eos_id fails otherwise)."""
    with tarfile.open(NEMO_FIXTURES / "tiny_gpt_ln_gelu_abs.nemo") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("_tok.model"))
        (tmp_path / "tok.model").write_bytes(tar.extractfile(member).read())
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "sep_token": "<extra_id_1>"} if named else ["<x>"]
    tokenizer = {"library": "sentencepiece", "model": str(tmp_path / "tok.model"), "sentencepiece_legacy": True}
    model = MegatronGPTModel(tiny_model_cfg(tokenizer={**tokenizer, "special_tokens": special_tokens}))
    messages = save(model, tmp_path / "m.nemo")
    if named:
        assert messages == []
    else:
        (message,) = messages
        assert "sentencepiece_legacy" in message and "eos_id fails" in message
