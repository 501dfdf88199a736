"""Run health, the parts that need no training run: the resume identity, the run lock,
untrusted .nemo tokenizer paths and the scratch directories, the non-finite check of a state dict."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.checkpoint import nemo_file, run_identity
from nemo_aligner.utils import run_lock
from nemo_aligner.utils.health import NonFiniteError, non_finite_keys, require_finite

# ---------------------------------------------------------------------------------------------- resume identity


def _view(**changes):
    cfg = {
        "trainer": {"dpo": {"max_steps": 10, "max_epochs": 1}},
        "model": {
            "global_batch_size": 4,
            "hidden_size": 64,
            "num_layers": 2,
            "optim": {"lr": 1e-4},
            "dpo": {"preference_loss": "dpo"},
            "data": {"data_prefix": {"train": []}},
        },
    }
    view = OmegaConf.create(cfg)
    for key, value in changes.items():
        OmegaConf.update(view, key, value)
    return view


def test_resume_refuses_what_changes_a_steps_meaning_and_warns_about_the_rest(tmp_path, caplog):
    data = tmp_path / "train.jsonl"
    data.write_text('{"a": 1}\n')
    stored = run_identity.identity_of(_view(**{"model.data.data_prefix.train": [str(data)]}), "dpo")
    assert stored["refuse"]["model.data.data_prefix.train"] is not None
    moved = tmp_path / "moved.jsonl"
    moved.write_bytes(data.read_bytes())
    legit = _view(**{"model.optim.lr": 1e-5, "trainer.dpo.max_steps": 20, "model.data.data_prefix.train": [str(moved)]})
    with caplog.at_level(logging.WARNING):
        assert run_identity.compare(stored, run_identity.identity_of(legit, "dpo"), tmp_path) == []
    assert "model.optim.lr=1e-05 (it was trained with 0.0001)" in caplog.text
    assert "trainer.dpo.max_steps=20 (it was trained with 10)" in caplog.text
    data.write_text('{"a": 2}\n')
    changed = _view(
        **{
            "model.global_batch_size": 8,
            "model.dpo.preference_loss": "ipo",
            "model.hidden_size": 128,
            "model.data.data_prefix.train": [str(data)],
        }
    )
    problems = dict(run_identity.compare(stored, run_identity.identity_of(changed, "dpo"), tmp_path))
    assert sorted(problems) == [
        "model.data.data_prefix.train",
        "model.dpo.preference_loss",
        "model.global_batch_size",
        "model.hidden_size",
    ]
    assert problems["model.global_batch_size"].startswith("4 in the checkpoint, 8 now")


# ---------------------------------------------------------------------------------------------- run lock


def test_lock_names_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = {"host": socket.gethostname(), "pid": child.pid, "started": "then", "start_ticks": None}
        (tmp_path / run_lock.LOCK_FILE).write_text(json.dumps(holder))
        with pytest.raises(run_lock.RunLockedError, match=f"PID {child.pid}, started then"):
            run_lock.acquire(tmp_path)
    finally:
        child.kill()
        child.wait()
    path = run_lock.acquire(tmp_path)  # the holder is gone: stale, taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(run_lock.RunLockedError):  # this process holds it now
        run_lock.acquire(tmp_path)
    run_lock.release(path)
    assert not path.exists()
    other_host = {"host": "elsewhere", "pid": 1, "started": "then"}
    path.write_text(json.dumps(other_host))
    with pytest.raises(run_lock.RunLockedError, match="host elsewhere, PID 1"):  # cannot be checked from here
        run_lock.acquire(tmp_path)


# ---------------------------------------------------------------------------------------------- untrusted .nemo


def _nemo_with_tokenizer(tmp_path, tokenizer: dict):
    root = tmp_path / "unpacked"
    (root / nemo_file.MODEL_WEIGHTS_DIR).mkdir(parents=True)
    (root / nemo_file.MODEL_CONFIG_FILE).write_text(OmegaConf.to_yaml({"tokenizer": tokenizer}))
    archive = tmp_path / "untrusted.nemo"
    with tarfile.open(archive, "w:") as tar:
        tar.add(root, arcname=".")
    return archive


@pytest.mark.parametrize(
    "value", ["/etc/hostname", "~/.ssh/id_rsa", "../outside.model", "nemo:../x.model", "nemo:/etc/hostname"]
)
def test_tokenizer_paths_outside_the_archive_are_refused_before_anything_is_opened(tmp_path, monkeypatch, value):
    archive = _nemo_with_tokenizer(tmp_path, {"library": "sentencepiece", "model": value})
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: opened.append(str(file)) or real_open(file, *a, **k))
    with pytest.raises(nemo_file.NemoFormatError, match=f"{archive}: refusing tokenizer.model="):
        with nemo_file.open_nemo(archive, with_weights=False):
            pass
    assert set(opened) == {str(archive)}  # only the archive itself was read


def test_errors_inside_an_opened_nemo_name_it_and_plain_names_still_load(tmp_path):
    archive = _nemo_with_tokenizer(tmp_path, {"library": "byte-level", "model": "nemo:abc_tokenizer.model"})
    with pytest.raises(nemo_file.NemoFormatError, match=f"^{archive}: config key 'tokenizer.model'"):
        with nemo_file.open_nemo(archive, with_weights=False) as unpacked:
            nemo_file.resolve_artifact_paths(nemo_file.read_model_config(unpacked), unpacked)


def test_scratch_directories_are_removed_at_exit(tmp_path):
    code = "from nemo_aligner.checkpoint import nemo_file; print(nemo_file.scratch_dir('nemo_aligner_artifacts_'))"
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    made = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert made.stdout.strip().startswith(str(tmp_path)) and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- finite state


def test_a_state_with_a_non_finite_tensor_is_never_written():
    from megatron.core.dist_checkpointing import ShardedTensor

    good = torch.ones(3)
    bad = torch.tensor([1.0, float("inf")])
    state = {
        "model": {"w": ShardedTensor.from_rank_offsets("model.w", good), "b": bad},
        "optimizer": [{"exp_avg": torch.tensor([float("nan")])}],
        "step": torch.tensor([3]),  # integers cannot be non-finite
    }
    assert non_finite_keys(state) == ["model.b", "optimizer.0.exp_avg"]
    with pytest.raises(NonFiniteError, match="step 7: refusing to write a checkpoint: non-finite .*model.b"):
        require_finite(state, "a checkpoint", 7)
    require_finite({"model": {"w": ShardedTensor.from_rank_offsets("model.w", good)}}, "a checkpoint", 7)


def test_large_data_files_are_fingerprinted_by_size_and_sampled_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(run_identity, "FULL_HASH_LIMIT", 1000)
    data = bytes(range(256)) * 100_000  # 25.6 MB, above the (patched) limit: sampled
    path, moved = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    path.write_bytes(data)
    moved.write_bytes(data)
    assert run_identity.data_fingerprint([str(path)]) == run_identity.data_fingerprint([str(moved)])
    edited = bytearray(data)
    edited[0] ^= 1  # the first block is always sampled
    moved.write_bytes(bytes(edited))
    assert run_identity.data_fingerprint([str(path)]) != run_identity.data_fingerprint([str(moved)])
    moved.write_bytes(data + b"\n")  # one line more
    assert run_identity.data_fingerprint([str(path)]) != run_identity.data_fingerprint([str(moved)])
