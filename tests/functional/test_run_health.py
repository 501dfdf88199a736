"""Run health end to end (issue 16): the non-finite guard per trainer, one run per results directory, user errors
as one line, Ctrl-C as a stop request.

The guard table: each trainer runs with ``non_finite.policy=skip`` and a NaN and an inf injected into the loss and
into the gradients at given steps (one run covers all four); the skipped steps leave the weights alone, the fourth
skip in a row stops the run with NonFiniteError, every file written holds only finite tensors, and resuming from
the last checkpoint ends bit-exactly where a run that never met the last injection ends.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nemo_aligner.checkpoint.nemo_file import open_nemo, read_torch_dist_tensors
from nemo_aligner.checkpoint.trainer_checkpoint import STATE_DIR, list_checkpoints, read_trainer_state
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.health import NonFiniteError
from tests.conftest import captured_log
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import REPO, SCRIPTS, run_sft_subprocess
from tests.functional.test_bad_inputs import CORPUS, repack

NAN, INF = float("nan"), float("inf")
# step -> (where, value): a NaN loss, a clean step, an inf loss, a NaN gradient, an inf gradient (1-based steps).
INJECTIONS = {2: ("loss", NAN), 4: ("loss", INF), 5: ("grad", NAN), 6: ("grad", INF)}
SKIP = ["non_finite.policy=skip", "non_finite.max_consecutive_skips=3"]

TRAINERS = {
    "sft": {
        "config": "gpt_sft_tiny",
        "module": "train_gpt_sft",
        "model": "nemo_aligner.models.nlp.gpt.gpt_sft_model.GPTSFTModel",
        "nemo": "megatron_gpt_sft.nemo",
        "overrides": [
            "model.data.train_ds.global_batch_size=2",
            "model.data.train_ds.micro_batch_size=1",
            "model.data.train_ds.file_path=$chat",
            "model.data.validation_ds.file_path=$chat",
            "trainer.sft.limit_val_batches=1",
        ],
    },
    "dpo": {
        "config": "gpt_dpo",
        "module": "train_gpt_dpo",
        "model": "nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model.MegatronGPTDPOModel",
        "nemo": "megatron_gpt_dpo.nemo",
        "overrides": [
            "pretrained_checkpoint.restore_from_path=$base",
            "model.global_batch_size=2",
            "model.micro_batch_size=1",
            "model.optim.name=adamw",
            "model.optim.sched.name=Constant",
            "model.data.data_prefix={train: [$dpo], validation: [$dpo], test: [$dpo]}",
            "trainer.dpo.max_epochs=2",
            "trainer.dpo.limit_val_batches=1",
            "model.dpo.reference=cpu_weight_swap",  # no reference precomputation over the whole data set
            *FP32,
        ],
    },
    "spin": {
        "config": "gpt_spin_tiny",
        "module": "train_gpt_spin",
        "model": "nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model.MegatronGPTSPINModel",
        "nemo": "megatron_gpt_spin.nemo",
        "overrides": [
            "pretrained_checkpoint.restore_from_path=$base",
            "trainer.spin.max_iterations=1",
            "trainer.spin.max_epochs=2",
            "trainer.spin.limit_train_batches=1.0",
            "trainer.spin.mask_unfinished_generations=false",  # the untrained model never ends: real gradients
            "model.data.train_ds.file_path=$chat",
            "model.data.validation_ds.file_path=$chat",
            "trainer.spin.limit_val_batches=1",
            "model.global_batch_size=2",
            "model.micro_batch_size=1",
            "model.spin.rollout_micro_batch_size=16",
            "model.spin.length_params.max_length=8",
        ],
    },
    "self_rewarding": {
        "config": "gpt_self_rewarding_tiny",
        "module": "train_gpt_self_rewarding",
        "model": "nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model.MegatronGPTSPINModel",
        "nemo": "megatron_gpt_self_rewarding.nemo",
        "overrides": [
            "pretrained_checkpoint.restore_from_path=$base",
            "trainer.self_rewarding.max_iterations=1",
            "trainer.self_rewarding.max_epochs=2",
            "trainer.self_rewarding.limit_train_batches=1.0",
            "model.data.train_ds.file_path=$chat",
            "model.data.validation_ds.file_path=$chat",
            "trainer.self_rewarding.limit_val_batches=1",
            "model.global_batch_size=2",
            "model.micro_batch_size=1",
            "model.spin.num_responses_to_gen=2",
            "model.spin.num_evals_to_average=1",
            "model.spin.use_meta_judge=false",
            "model.spin.first_iteration_sft=true",  # real gradients from an untrained judge's model
            "model.spin.length_params.max_length=8",
            "model.spin.judge_length_params.max_length=8",
        ],
    },
}


@pytest.fixture(scope="module")
def base_nemo(tmp_path_factory) -> Path:
    """The NeMo-written tiny fixture with a 256-token context (the chat template fits)."""
    from tests.conftest import NEMO_FIXTURES

    root = tmp_path_factory.mktemp("health_base")
    fixture = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    return repack(fixture, root / "base.nemo", encoder_seq_length=256, max_position_embeddings=256)


def _import(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def run(trainer: str, log_dir: Path, base: Path, *extra: str, injections=None, monkeypatch=None):
    """Run a trainer in-process; ``injections`` (step -> (where, value)) corrupt the loss or the gradients."""
    spec = TRAINERS[trainer]
    loop = trainer
    overrides = [
        f"exp_manager.explicit_log_dir={log_dir}",
        f"trainer.{loop}.save_interval=5",
        f"trainer.{loop}.val_check_interval=100",
        *[_substitute(o, base) for o in spec["overrides"]],
        *[f"trainer.{loop}.{o}" for o in extra if not o.startswith(("model.", "exp_manager."))],
        *[o for o in extra if o.startswith(("model.", "exp_manager."))],
    ]
    cfg = compose_config(SCRIPTS / "conf", spec["config"], overrides)
    with monkeypatch.context() as patch:
        if injections:
            inject(patch, _import(spec["model"]), injections)
        main = __import__(f"examples.nlp.gpt.{spec['module']}", fromlist=["main"]).main
        main(cfg)


def _substitute(override: str, base: Path) -> str:
    """$base: the tiny .nemo; $chat / $dpo: 8-sample files of the bad-input corpus (4 steps of 2 per epoch)."""
    data = CORPUS / "data"
    for name, value in (("$base", base), ("$chat", data / "chat_good.jsonl"), ("$dpo", data / "dpo_good.jsonl")):
        override = override.replace(name, str(value))
    return override


def inject(patch, model_cls, injections) -> None:
    """Wrap ``get_loss_and_metrics``: at a listed training step, the reported loss or one gradient entry becomes
    the value (each alone, so each detection path is proven on its own)."""
    original = model_cls.get_loss_and_metrics
    calls = {"step": 0}

    def corrupted(self, batch, forward_only):
        loss, metrics = original(self, batch=batch, forward_only=forward_only)
        if forward_only:
            return loss, metrics
        calls["step"] += 1
        where, value = injections.get(calls["step"], (None, None))
        if where == "loss":
            metrics = {**metrics, "loss": torch.tensor(value)}
        elif where == "grad":
            param = next(p for p in self.model_chunks()[0].parameters() if p.requires_grad)
            grad = param.main_grad if getattr(param, "main_grad", None) is not None else param.grad
            grad.view(-1)[0] = value
        return loss, metrics

    patch.setattr(model_cls, "get_loss_and_metrics", corrupted)


def written_tensors(log_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every checkpoint and .nemo written under ``log_dir``."""
    tensors = {}
    for checkpoint in list_checkpoints(log_dir / "checkpoints"):
        for key, value in read_torch_dist_tensors(checkpoint / STATE_DIR).items():
            tensors[f"{checkpoint.name}/{key}"] = value
    for nemo in (log_dir / "checkpoints").glob("*.nemo"):
        with open_nemo(nemo) as unpacked:
            for key, value in read_torch_dist_tensors(unpacked / "model_weights").items():
                tensors[f"{nemo.name}/{key}"] = value
    return tensors


def final_weights(log_dir: Path, name: str) -> dict[str, torch.Tensor]:
    with open_nemo(log_dir / "checkpoints" / name) as unpacked:
        return read_torch_dist_tensors(unpacked / "model_weights")


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_nan_and_inf_in_loss_and_gradients_are_skipped_then_stop_and_resume_is_exact(
    trainer, tmp_path, base_nemo, monkeypatch
):
    steps = 8
    # The reference: injections at steps 2, 4 and 5 only; three skips, never three in a row; trains to the end.
    reference = tmp_path / "reference"
    first_three = {step: what for step, what in INJECTIONS.items() if step < 6}
    run(trainer, reference, base_nemo, f"max_steps={steps}", *SKIP, injections=first_three, monkeypatch=monkeypatch)
    # The run under test meets the fourth injection too: steps 4, 5, 6 skipped in a row -> NonFiniteError at 6.
    broken = tmp_path / "broken"
    with pytest.raises(NonFiniteError) as info:
        run(trainer, broken, base_nemo, f"max_steps={steps}", *SKIP, injections=INJECTIONS, monkeypatch=monkeypatch)
    message = str(info.value)
    assert "step 6: non-finite gradient norm" in message and "3 consecutive steps skipped" in message, message
    # Nothing non-finite was written; the last checkpoint is step 5's (a skipped step: weights untouched), no .nemo.
    written = written_tensors(broken)
    assert written and all(bool(torch.isfinite(t).all()) for t in written.values())
    checkpoints = list_checkpoints(broken / "checkpoints")
    assert read_trainer_state(checkpoints[-1])["step"] == 5
    assert read_trainer_state(checkpoints[-1])["non_finite_skipped"] == 3
    assert not list((broken / "checkpoints").glob("*.nemo"))
    # Resumed without the injection, the run ends bit-exactly where the reference ended.
    run(trainer, broken, base_nemo, f"max_steps={steps}", *SKIP, monkeypatch=monkeypatch)
    expected, actual = (
        final_weights(reference, TRAINERS[trainer]["nemo"]),
        final_weights(broken, TRAINERS[trainer]["nemo"]),
    )
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert all(bool(torch.isfinite(t).all()) for t in written_tensors(broken).values())
    # The clean steps did update the weights (so "equal" above means something); the skips are counted.
    rows = [row for row in csv.DictReader((reference / "csv" / "metrics.csv").open()) if row.get("train/grad_norm")]
    assert [float(row["train/grad_norm"]) > 0 for row in rows if int(row["step"]) in (1, 3, 7, 8)] == [True] * 4
    assert float(rows[-1]["train/skipped_steps"]) == 3


# ---------------------------------------------------------------------------------------------------------------
# As a user runs it: a subprocess per command
# ---------------------------------------------------------------------------------------------------------------
TINY_SFT = [
    "model.data.train_ds.global_batch_size=2",
    "model.data.train_ds.micro_batch_size=1",
    "trainer.sft.limit_val_batches=1",
    "trainer.sft.val_check_interval=100",
]


def test_a_diverging_run_stops_by_default_and_keeps_its_last_good_checkpoint(tmp_path):
    """A real divergence (learning rate 1e30) under the YAML default, policy stop: NonFiniteError at step 2 naming
    the quantity and the key, step 1's checkpoint kept, only finite tensors on disk, no .nemo."""
    from examples.nlp.gpt.train_gpt_sft import main

    lr_too_high = ["model.optim.lr=1e30", "model.optim.sched.warmup_steps=0", "trainer.sft.save_interval=1"]
    log_dir = tmp_path / "diverged"
    cfg = compose_config(
        SCRIPTS / "conf",
        "gpt_sft_tiny",
        [f"exp_manager.explicit_log_dir={log_dir}", "trainer.sft.max_steps=4", *TINY_SFT, *lr_too_high],
    )
    with pytest.raises(NonFiniteError, match="step 2: non-finite gradient norm") as info:
        main(cfg)
    assert "trainer.sft.non_finite.policy=stop" in str(info.value)
    (checkpoint,) = list_checkpoints(log_dir / "checkpoints")
    assert read_trainer_state(checkpoint)["step"] == 1
    written = written_tensors(log_dir)
    assert written and all(bool(torch.isfinite(t).all()) for t in written.values())
    assert not (log_dir / "run.lock").exists()


def test_hydra_full_error_still_shows_the_traceback(tmp_path):
    full = run_sft_subprocess(tmp_path / "full", "trainer.sft.max_steps=0", env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr and "trainer.sft.max_steps: 0 would" in full.stderr


@pytest.mark.slow  # kills and restarts whole processes
def test_second_run_on_a_directory_fails_naming_the_first_and_a_killed_run_resumes(tmp_path):
    log_dir = tmp_path / "shared"
    command = [sys.executable, str(SCRIPTS / "train_gpt_sft.py"), "--config-name", "gpt_sft_tiny"]
    command.append(f"exp_manager.explicit_log_dir={log_dir}")
    command += [*TINY_SFT, "trainer.sft.save_interval=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list_checkpoints(log_dir / "checkpoints"):
            assert first.poll() is None and time.monotonic() < deadline, "the first run ended or never saved"
            time.sleep(0.5)
        started = time.monotonic()
        second = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        elapsed = time.monotonic() - started
        print(f"second run refused after {elapsed:.1f} s (interpreter start-up included)")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert len([line for line in second.stderr.splitlines() if line.startswith("error: ")]) == 1
        assert f"in use by another run (host {os.uname().nodename}, PID {first.pid}," in second.stderr, second.stderr
        first.kill()  # SIGKILL: run.lock stays behind, stale
        first.wait()
        assert (log_dir / "run.lock").is_file()
        saved = read_trainer_state(list_checkpoints(log_dir / "checkpoints")[-1])["step"]
    finally:
        first.kill()
        first.wait()
    # The same command again (in-process, one step further) takes the stale lock over and resumes.
    from examples.nlp.gpt.train_gpt_sft import main

    overrides = [*command[4:], f"trainer.sft.max_steps={saved + 1}"]  # after script and --config-name
    with captured_log("nemo_aligner") as records:
        main(compose_config(SCRIPTS / "conf", "gpt_sft_tiny", overrides))
    assert any(f"Resumed at step {saved} " in r.getMessage() for r in records)
    assert read_trainer_state(list_checkpoints(log_dir / "checkpoints")[-1])["step"] == saved + 1
    assert not (log_dir / "run.lock").exists()


@pytest.mark.slow  # kills and restarts whole processes
def test_ctrl_c_saves_at_the_step_boundary_and_a_finished_run_says_so(tmp_path):
    log_dir = tmp_path / "interrupted"
    steps = ["trainer.sft.max_steps=3", "trainer.sft.save_interval=100", *TINY_SFT]
    ctrl_c = {"NEMO_ALIGNER_KILL_AT": "after_step:2", "NEMO_ALIGNER_KILL_SIGNAL": "INT"}
    interrupted = run_sft_subprocess(log_dir, *steps, env=ctrl_c)
    assert interrupted.returncode == 0, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr and "KeyboardInterrupt" not in interrupted.stderr
    assert interrupted.stderr.count("SIGINT received") == 1
    (checkpoint,) = list_checkpoints(log_dir / "checkpoints")
    assert read_trainer_state(checkpoint)["step"] == 2
    assert not (log_dir / "run.lock").exists()
    # In-process from here (same command, no start-up cost): the resumed run finishes, a rerun says it is finished.
    cfg = compose_config(SCRIPTS / "conf", "gpt_sft_tiny", [f"exp_manager.explicit_log_dir={log_dir}", *steps])
    from examples.nlp.gpt.train_gpt_sft import main

    main(cfg.copy())
    assert read_trainer_state(list_checkpoints(log_dir / "checkpoints")[-1])["step"] == 3
    before = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    with captured_log("nemo_aligner") as records:
        main(cfg.copy())
    assert any("already finished: resumed at step 3 of max_steps=3" in r.getMessage() for r in records)
    assert sorted(p.name for p in (log_dir / "checkpoints").iterdir()) == before


# ---------------------------------------------------------------------------------------------------------------
# Two ranks: a non-finite loss on one rank stops both at the same step
# ---------------------------------------------------------------------------------------------------------------
def guard_on_two_ranks(log_dir: str) -> dict:
    """One rank of a data-parallel SFT run whose rank 1 alone reports a NaN loss at step 2 (policy stop)."""
    import torch.distributed as dist

    from examples.nlp.gpt.train_gpt_sft import main
    from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel

    overrides = [
        f"exp_manager.explicit_log_dir={log_dir}",
        "trainer.devices=2",
        "trainer.sft.max_steps=4",
        "trainer.sft.save_interval=1",
        *[_substitute(o, Path()) for o in TRAINERS["sft"]["overrides"]],
        "trainer.sft.val_check_interval=100",
    ]
    cfg = compose_config(SCRIPTS / "conf", "gpt_sft_tiny", overrides)
    rank = int(os.environ["RANK"])
    with pytest.MonkeyPatch.context() as patch:
        inject(patch, GPTSFTModel, {2: ("loss", NAN)} if rank == 1 else {})
        try:
            main(cfg)
        except NonFiniteError as err:
            return {"error": str(err), "world": dist.get_world_size()}
    return {"error": None}


@pytest.mark.slow  # two processes: outside the 3-minute budget of this default tests
def test_a_nan_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    from tests.distributed.multiprocess import run_distributed

    log_dir = tmp_path / "two_ranks"
    results = run_distributed(f"{__name__}:guard_on_two_ranks", 2, tmp_path / "out", log_dir=str(log_dir))
    assert [r["error"] is not None and r["error"].startswith("step 2: non-finite loss") for r in results] == [
        True,
        True,
    ], results
    assert results[0]["world"] == 2
    (checkpoint,) = list_checkpoints(log_dir / "checkpoints")
    assert read_trainer_state(checkpoint)["step"] == 1
    assert not (log_dir / "run.lock").exists()
