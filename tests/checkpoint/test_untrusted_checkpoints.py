"""Loading a `.nemo` or a trainer checkpoint never runs code from the file.

Every crafted file carries a pickle whose ``__reduce__`` would create a marker file (or a YAML tag that would call
a function, or a tar member that would land outside the extraction directory). Each goes through the loader users
call (``MegatronGPTModel.restore_from``, ``load_checkpoint_model_config``, ``load_checkpoint``, the entry script),
which must refuse it with an error naming the file, and the marker must never appear.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from nemo_aligner.checkpoint import trainer_checkpoint
from nemo_aligner.checkpoint.nemo_file import NemoFormatError, open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import CheckpointError, load_checkpoint
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.utils import load_checkpoint_model_config
from tests.conftest import NEMO_FIXTURES
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import SCRIPTS

FIXTURE = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


class Payload:
    """Unpickles into ``os.system("touch <marker>")``: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def unpack(archive: Path, dest: Path) -> Path:
    """Trusted extraction of the NeMo-written fixture, to tamper with."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def pack(source_dir: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:") as tar:
        tar.add(source_dir, arcname=".")
    return archive


def malicious_nemo(tmp_path: Path, tamper) -> Path:
    """The fixture `.nemo` with ``tamper(unpacked_dir)`` applied, packed again."""
    unpacked = unpack(FIXTURE, tmp_path / "unpacked")
    tamper(unpacked)
    return pack(unpacked, tmp_path / "evil.nemo")


def dcp_with_payload(weights_dir: Path, marker: Path) -> None:
    """Rewrite a torch_dist directory with its tensors plus a byte entry holding the payload (as `_extra_state`
    is stored)."""
    import torch.distributed.checkpoint as dcp

    tensors = read_torch_dist_tensors(weights_dir)
    metadata_json = (weights_dir / "metadata.json").read_bytes()
    shutil.rmtree(weights_dir)
    state = {**tensors, "model.decoder.layers.mlp.linear_fc1._extra_state": Payload(marker)}
    dcp.save(state, checkpoint_id=weights_dir, no_dist=True)
    (weights_dir / "metadata.json").write_bytes(metadata_json)


# ---------------------------------------------------------------------------------------------------------------
# .nemo files
# ---------------------------------------------------------------------------------------------------------------


def _dcp_metadata(unpacked: Path, marker: Path) -> None:
    (unpacked / "model_weights" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _dcp_byte_entry(unpacked: Path, marker: Path) -> None:
    dcp_with_payload(unpacked / "model_weights", marker)


def _legacy_weights(unpacked: Path, marker: Path) -> None:
    shutil.rmtree(unpacked / "model_weights")
    torch.save(
        {"model.embedding.word_embeddings.weight": torch.ones(1), "evil": Payload(marker)},
        unpacked / "model_weights.ckpt",
    )


NEMO_PAYLOADS = [
    ("dcp_metadata", _dcp_metadata, r"model_weights/\.metadata: refusing to unpickle (posix|os)\.system"),
    (
        "dcp_byte_entry",
        _dcp_byte_entry,
        r"model_weights: refusing entry 'model\.decoder\.layers\.mlp\.linear_fc1\._extra_state'",
    ),
    (
        "legacy_model_weights_ckpt",
        _legacy_weights,
        r"model_weights\.ckpt: refusing to load, it needs unrestricted unpickling",
    ),
]


@pytest.mark.parametrize(("place", "tamper", "message"), NEMO_PAYLOADS, ids=[p[0] for p in NEMO_PAYLOADS])
def test_nemo_pickle_payload_is_refused(tmp_path, place, tamper, message):
    marker = tmp_path / "pwned"
    archive = malicious_nemo(tmp_path, lambda unpacked: tamper(unpacked, marker))
    with pytest.raises(NemoFormatError, match=message):
        MegatronGPTModel.restore_from(archive)
    assert not marker.exists()


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:os.system ['touch {marker}']",
        "!!python/name:os.system",
        "!!python/object:pathlib.PosixPath {{}}",
    ],
)
def test_model_config_python_tags_are_refused(tmp_path, tag):
    marker = tmp_path / "pwned"

    def tamper(unpacked: Path) -> None:
        config = unpacked / "model_config.yaml"
        config.write_text(config.read_text() + f"evil: {tag.format(marker=marker)}\n")

    archive = malicious_nemo(tmp_path, tamper)
    for load in (load_checkpoint_model_config, MegatronGPTModel.restore_from):
        with pytest.raises(NemoFormatError, match=r"model_config\.yaml: cannot parse YAML"):
            load(archive)
    assert not marker.exists()


def test_entry_script_refuses_a_malicious_pretrained_checkpoint(tmp_path):
    """The DPO script reads the checkpoint's weight metadata while validating: the payload is refused there."""
    from examples.nlp.gpt.train_gpt_dpo import main

    marker = tmp_path / "pwned"
    archive = malicious_nemo(tmp_path, lambda unpacked: _dcp_metadata(unpacked, marker))
    overrides = [f"pretrained_checkpoint.restore_from_path={archive}", f"exp_manager.explicit_log_dir={tmp_path / 'r'}"]
    overrides += FP32
    with pytest.raises(ValueError, match=r"restore_from_path: .*\.metadata: refusing to unpickle (posix|os)\.system"):
        main(compose_config(SCRIPTS / "conf", "gpt_dpo", overrides))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------------
# tar members escaping the extraction directory
# ---------------------------------------------------------------------------------------------------------------


def member(name: str, data: bytes = b"owned\n", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, io.BytesIO(data)
    return info, None


def escape_tars(outside: Path) -> dict[str, list[tuple]]:
    """Archives that, extracted naively under ``<outside>/extract/<tmp>``, would write into ``outside``."""
    config = member("./model_config.yaml", b"a: 1\n")
    return {
        "absolute_path": [config, member(str(outside / "marker"))],
        "dot_dot": [config, member("./../../../marker")],
        "dot_dot_inside_weights": [config, member("./model_weights/../../../marker")],
        "symlink_absolute_then_write_through": [
            config,
            member("./out", kind=tarfile.SYMTYPE, link=str(outside)),
            member("./out/marker"),
        ],
        "symlink_dot_dot": [config, member("./up", kind=tarfile.SYMTYPE, link="../../..")],
        "hardlink_absolute_then_overwrite": [
            config,
            member("./victim", kind=tarfile.LNKTYPE, link=str(outside / "victim.txt")),
            member("./victim"),
        ],
        "hardlink_dot_dot": [config, member("./victim", kind=tarfile.LNKTYPE, link="../../../victim.txt")],
    }


@pytest.mark.parametrize("name", list(escape_tars(Path("/x"))))
def test_tar_escapes_are_refused(tmp_path, name):
    outside = tmp_path / "outside"
    extract_root = outside / "extract"
    extract_root.mkdir(parents=True)
    victim = outside / "victim.txt"
    victim.write_text("original\n")
    archive = tmp_path / f"{name}.nemo"
    with tarfile.open(archive, "w:") as tar:
        for info, data in escape_tars(outside)[name]:
            tar.addfile(info, data)

    with pytest.raises(NemoFormatError, match=rf"{name}\.nemo: refusing tar member .*escapes the extraction directory"):
        with open_nemo(archive, tmp_dir=extract_root):
            pass
    for load in (load_checkpoint_model_config, MegatronGPTModel.restore_from):
        with pytest.raises(NemoFormatError, match="refusing tar member"):
            load(archive)
    assert sorted(os.listdir(outside)) == ["extract", "victim.txt"]
    assert os.listdir(extract_root) == []
    assert victim.read_text() == "original\n"


# ---------------------------------------------------------------------------------------------------------------
# trainer checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _rng(checkpoint: Path, marker: Path) -> None:
    torch.save({"torch": torch.get_rng_state(), "python": Payload(marker)}, checkpoint / "rng" / "rank_0.pt")


def _state_metadata(checkpoint: Path, marker: Path) -> None:
    (checkpoint / "state" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _state_byte_entry(checkpoint: Path, marker: Path) -> None:
    dcp_with_payload(checkpoint / "state", marker)


def _common_state(checkpoint: Path, marker: Path) -> None:
    torch.save({"optimizer": {"param_groups": Payload(marker)}}, checkpoint / "state" / "common.pt")


TRAINER_PAYLOADS = [
    ("rng_state", _rng, r"rng/rank_0\.pt: refusing, it needs unrestricted unpickling"),
    ("dcp_metadata", _state_metadata, r"state/\.metadata: refusing to unpickle (posix|os)\.system"),
    ("extra_state_byte_entry", _state_byte_entry, r"state: refusing entry 'model\.decoder\.layers\.mlp\.linear_fc1"),
    ("optimizer_state_in_common_pt", _common_state, r"state/common\.pt: refusing, it needs unrestricted unpickling"),
]


@pytest.mark.parametrize(("place", "tamper", "message"), TRAINER_PAYLOADS, ids=[p[0] for p in TRAINER_PAYLOADS])
def test_trainer_checkpoint_pickle_payload_is_refused(tmp_path, one_step_sft_checkpoint, place, tamper, message):
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / one_step_sft_checkpoint.name
    shutil.copytree(one_step_sft_checkpoint, checkpoint)
    tamper(checkpoint, marker)
    with pytest.raises(CheckpointError, match=rf"cannot resume from {checkpoint}: .*{message}"):
        load_checkpoint(checkpoint, {})
    assert not marker.exists()


def test_resuming_entry_script_refuses_before_building_anything(tmp_path, one_step_sft_checkpoint, monkeypatch):
    from examples.nlp.gpt.train_gpt_sft import main

    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "results" / "checkpoints" / one_step_sft_checkpoint.name
    shutil.copytree(one_step_sft_checkpoint, checkpoint)
    _state_metadata(checkpoint, marker)
    monkeypatch.setattr(MegatronGPTModel, "__init__", lambda *a, **k: pytest.fail("a model was built"))
    overrides = [f"exp_manager.explicit_log_dir={tmp_path / 'results'}", "trainer.sft.max_steps=2"]
    with pytest.raises(ValueError, match=r"exp_manager\.resume_if_exists: cannot resume from .*refusing to unpickle"):
        main(compose_config(SCRIPTS / "conf", "gpt_sft_tiny", overrides))
    assert not marker.exists()


def test_unreadable_trainer_state_is_a_clear_error(tmp_path, one_step_sft_checkpoint):
    checkpoint = tmp_path / one_step_sft_checkpoint.name
    shutil.copytree(one_step_sft_checkpoint, checkpoint)
    (checkpoint / "trainer_state.json").write_text('{"step": 1')
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: unreadable trainer state"):
        trainer_checkpoint.list_checkpoints(tmp_path)
    (checkpoint / "trainer_state.json").write_text(json.dumps([1]))
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: expected a JSON object, got list"):
        load_checkpoint(checkpoint, {})
