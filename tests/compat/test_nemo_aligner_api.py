"""NeMo-Aligner's Python API (docs/coming_from_nemo_aligner.md, "Custom pipelines"): every name its entry scripts
import exists; each behaves as our own helper on tiny inputs; pipelines written in its call order train exactly as
our entry scripts; the SPIN model page's usage example runs verbatim."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state as megatron_parallel_state
from omegaconf import OmegaConf

from nemo_aligner.algorithms.dpo import dpo_custom_collate
from nemo_aligner.algorithms.spin import spin_custom_collate
from nemo_aligner.data.nlp import builders
from nemo_aligner.data.nlp.dpo_builders import build_dpo_dataloader, build_dpo_datasets
from nemo_aligner.data.nlp.dpo_dataset import DPOCollate
from nemo_aligner.data.nlp.pairs import pair_item
from nemo_aligner.utils.config import compose_config
from nemo_aligner.utils.distributed import initialize_distributed
from nemo_aligner.utils.exp_manager import RunTimer
from tests.cpu_fp32 import FP32
from tests.functional.sft_runs import SCRIPTS

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "coming_from_nemo_aligner.md"
TABLE_ROW = re.compile(r"^\| `(nemo_aligner[\w.]*)` \| `(\w+)` \| (same|thin entry|refused)", re.MULTILINE)


def documented_names() -> list[tuple[str, str, str]]:
    return TABLE_ROW.findall(DOC.read_text(encoding="utf-8"))


def test_the_table_lists_every_name_of_the_four_scripts():
    names = {(module, name) for module, name, _ in documented_names()}
    # The scripts' imports from nemo_aligner (SFT, DPO, SPIN on main; Self-Rewarding on PR #321): 28 names.
    assert len(names) == 28
    assert ("nemo_aligner.utils.train_script_utils", "retrieve_custom_trainer_state_dict") in names
    assert ("nemo_aligner.experimental.self_rewarding.self_rewarding", "SelfRewardingTrainer") in names


@pytest.mark.parametrize("module,name,status", documented_names())
def test_every_documented_name_imports(module, name, status):
    namespace: dict = {}
    exec(f"from {module} import {name}", namespace)  # the scripts' own import statement
    assert namespace[name] is not None


METHOD_ROW = re.compile(r"^\| `(\w+)` \| `(\w+)` \| (same|thin entry|refused)", re.MULTILINE)
CLASSES = {
    "MegatronGPTDPOModel": "nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model",
    "MegatronGPTSPINModel": "nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model",
    "BaseTrainer": "nemo_aligner.algorithms.base",
    "SPINTrainer": "nemo_aligner.algorithms.spin",
    "SelfRewardingTrainer": "nemo_aligner.algorithms.self_rewarding",
}


@pytest.mark.parametrize("cls_name,name,status", METHOD_ROW.findall(DOC.read_text(encoding="utf-8")))
def test_every_documented_method_exists_and_refusals_say_what_to_use(cls_name, name, status):
    import importlib

    cls = getattr(importlib.import_module(CLASSES[cls_name]), cls_name)
    assert hasattr(cls, name)
    if status == "refused":
        with pytest.raises(NotImplementedError, match=f"{name} .* is not provided: .+"):
            getattr(object.__new__(cls), name)(None)


def test_the_method_table_lists_the_issues_names():
    rows = {(cls_name, name) for cls_name, name, _ in METHOD_ROW.findall(DOC.read_text(encoding="utf-8"))}
    assert len(rows) == 22
    assert {("SPINTrainer", "augment_dataloader"), ("SelfRewardingTrainer", "get_elo_scores")} <= rows


PAIRS = [
    pair_item(0, [5, 6], [7, 8, 9], [10], chosen_reward=1.0, rejected_reward=0.0, valid=True),
    pair_item(1, [11], [12], [13, 14, 15, 16], chosen_reward=1.0, rejected_reward=0.0, valid=True),
]


def assert_same_batch(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def test_collate_functions_are_ours_padded_with_eos():
    assert_same_batch(dpo_custom_collate(PAIRS, eos_id=3), DPOCollate(3)(PAIRS))
    assert dpo_custom_collate(PAIRS, eos_id=3, pad_length_to_multiple_of=8)["chosen"].shape == (2, 8)
    assert_same_batch(spin_custom_collate(PAIRS, eos_id=3), DPOCollate(3)(PAIRS))
    batch = spin_custom_collate(PAIRS, 3)
    assert batch["chosen"][0].tolist() == [5, 6, 7, 8, 9] and batch["rejected"][0].tolist() == [5, 6, 10, 3, 3]
    for collate in (dpo_custom_collate, spin_custom_collate):
        with pytest.raises(ValueError, match="reset_position_ids=True is not supported"):
            collate(PAIRS, eos_id=3, reset_position_ids=True)
    assert builders.identity_collate(PAIRS) is PAIRS


def test_timer_parallel_state_and_refusals():
    from nemo_aligner.utils import parallel_state
    from nemo_aligner.utils.distributed import Timer

    assert Timer is RunTimer and not Timer(None).is_finished() and Timer("00:00:00:00").is_finished()
    assert parallel_state.get_data_parallel_world_size is megatron_parallel_state.get_data_parallel_world_size
    with pytest.raises(AttributeError, match="megatron.core.parallel_state"):
        parallel_state.no_such_function  # noqa: B018
    with pytest.raises(NotImplementedError, match="packed_sequences=true"):
        builders.build_train_valid_test_dpo_packed_datasets()
    with pytest.raises(ValueError, match="load_gbs=False"):
        builders.build_dataloader(cfg={"model": {}}, dataset=[], gbs=2, load_gbs=False)


def test_dpo_builders_equal_ours():
    from nemo_aligner.tokenizers import build_tokenizer

    initialize_distributed()
    cfg = compose_config(SCRIPTS / "conf", "gpt_dpo", ["model.encoder_seq_length=256"])
    OmegaConf.resolve(cfg)
    tokenizer = build_tokenizer(OmegaConf.create({"library": "byte-level"}))
    train, validation, test = builders.build_train_valid_test_dpo_datasets(
        cfg=cfg.model, data_prefix=cfg.model.data.data_prefix, data_impl="jsonl", tokenizer=tokenizer
    )
    ours = build_dpo_datasets(cfg.model.data, None, tokenizer, dpo_cfg=cfg.model.dpo)
    assert [len(train), len(validation), len(test)] == [len(ours[s]) for s in ("train", "validation", "test")]
    assert_same_batch(DPOCollate(0)([train[0], train[1]]), DPOCollate(0)([ours["train"][0], ours["train"][1]]))
    # The loader NeMo-Aligner's scripts build, collated by the trainer's collate_fn, draws our DPO batches.
    loader = builders.build_dataloader(cfg=cfg, dataset=train, consumed_samples=0, gbs=4, collate_fn=identity)
    assert loader.collate_fn is identity
    expected = build_dpo_dataloader(cfg.model.data, train, tokenizer, 4, train=True, seed=cfg.model.seed)
    first = next(iter(loader))
    assert [item["sample_index"] for item in first] == next(iter(expected))["sample_index"].tolist()


def identity(items):
    return items


def test_nemo_aligner_sft_dataset_call_equals_ours():
    from nemo_aligner.tokenizers import build_tokenizer

    cfg = compose_config(SCRIPTS / "conf", "gpt_spin", [])
    OmegaConf.resolve(cfg)
    tokenizer = build_tokenizer(compose_config(SCRIPTS / "conf", "gpt_sft_tiny", []).model.tokenizer)  # the default's
    split = cfg.model.data.validation_ds
    theirs = builders.build_sft_dataset(
        split, tokenizer, None, answer_only_loss=True, is_chat=True, special_tokens=cfg.model.data.chat_prompt_tokens
    )
    ours = builders.build_sft_dataset(cfg.model.data, split, tokenizer, cfg.model.seed)
    assert len(theirs) == len(ours) and theirs.prompt_and_answer(3) == ours.prompt_and_answer(3)
    assert_same_batch(theirs.collate_fn([theirs[0], theirs[1]]), builders.SFTCollate(ours.pad_id)([ours[0], ours[1]]))
    padded = builders.collate_with_pad_to_max_batch(200, theirs.pad_id, None)([theirs[0], theirs[1]])
    natural = theirs.collate_fn([theirs[0], theirs[1]])
    assert natural["input_ids"].shape[-1] < 200 and all(v.shape[-1] == 200 for v in padded.values() if v.dim() == 2)
    with pytest.raises(ValueError, match="answer_only_loss=False"):
        builders.build_sft_dataset(split, tokenizer, None, answer_only_loss=False)


@pytest.fixture(scope="module")
def untrained_default_model(tmp_path_factory) -> Path:
    """The embedded default's architecture, freshly initialised, as a .nemo (fast; the first step's loss is log 2
    for any weights)."""
    from nemo_aligner.models.nlp.gpt.gpt_sft_model import GPTSFTModel

    cfg = compose_config(SCRIPTS / "conf", "gpt_sft_tiny", [])
    OmegaConf.resolve(cfg)
    path = tmp_path_factory.mktemp("untrained") / "tiny.nemo"
    GPTSFTModel(cfg.model).save_to(path)
    return path


def test_the_spin_model_page_example_runs_verbatim(untrained_default_model):
    from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
    from nemo_aligner.utils.utils import (
        load_and_override_model_config,
        load_from_nemo,
        retrieve_model_state_dict_in_cpu,
    )

    cfg = compose_config(
        SCRIPTS / "conf",
        "gpt_spin",
        [
            f"pretrained_checkpoint.restore_from_path={untrained_default_model}",
            "model.spin.ref_policy_kl_penalty=[0.3,0.1]",
            *FP32,
        ],
    )
    trainer = None
    cfg.model = load_and_override_model_config(cfg.pretrained_checkpoint.restore_from_path, cfg.model)
    # The seed's example, verbatim:
    ptl_model = load_from_nemo(
        MegatronGPTSPINModel,
        cfg.model,
        trainer,
        strict=True,
        restore_path=cfg.pretrained_checkpoint.restore_from_path,
    )
    ref_policy_state_dict = retrieve_model_state_dict_in_cpu(
        ptl_model, megatron_amp_O2=cfg.model.get("megatron_amp_O2", False)
    )
    ptl_model.ref_policy_state_dict = ref_policy_state_dict
    ptl_model.set_KL_penalty_by_iteration(0)
    # ${trainer.precision} resolved against the run config; the architecture (and context) from the checkpoint.
    assert ptl_model.cfg.precision == cfg.trainer.precision
    stored = MegatronGPTSPINModel.restore_from(untrained_default_model, return_config=True)
    assert ptl_model.cfg.encoder_seq_length == stored.encoder_seq_length != 4096
    assert ptl_model.ref_policy_kl_penalty == 0.3
    assert ptl_model.ref_policy_state_dict is ref_policy_state_dict
    name, weight = next(iter(ptl_model.model.state_dict(prefix="model.").items()))
    assert torch.equal(ref_policy_state_dict[name], weight.cpu())


def losses(log_dir: Path) -> list[float]:
    with open(log_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_dpo_in_nemo_aligner_call_order_trains_as_our_entry_script(tmp_path, untrained_default_model):
    """tests/compat/nemo_aligner_style_dpo.py makes NeMo-Aligner's train_gpt_dpo.py calls in its order."""
    from examples.nlp.gpt.train_gpt_dpo import main as ours
    from tests.compat.nemo_aligner_style_dpo import main as theirs
    from tests.functional.test_dpo import SCALE_DOWN

    runs = {}
    for name, main in (("ours", ours), ("theirs", theirs)):
        overrides = [
            f"pretrained_checkpoint.restore_from_path={untrained_default_model}",
            f"exp_manager.explicit_log_dir={tmp_path / name}",
        ]
        main(compose_config(SCRIPTS / "conf", "gpt_dpo", overrides + SCALE_DOWN))
        runs[name] = losses(tmp_path / name)
    assert runs["theirs"][0] == pytest.approx(math.log(2), abs=1e-6)
    # Our default reference is precomputed, theirs the CPU weight swap: equal up to float rounding.
    assert runs["theirs"] == pytest.approx(runs["ours"], abs=1e-6) and len(runs["theirs"]) == 2
    assert (tmp_path / "theirs" / "checkpoints" / "megatron_gpt_dpo.nemo").is_file()


def test_spin_in_nemo_aligner_call_order_trains_as_our_entry_script(tmp_path, untrained_default_model):
    """tests/compat/nemo_aligner_style_spin.py makes NeMo-Aligner's train_gpt_spin.py calls in its order."""
    from examples.nlp.gpt.train_gpt_spin import main as ours
    from tests.compat.nemo_aligner_style_spin import main as theirs
    from tests.functional.test_spin import SCALE_DOWN

    runs = {}
    for name, main in (("ours", ours), ("theirs", theirs)):
        overrides = [
            f"pretrained_checkpoint.restore_from_path={untrained_default_model}",
            f"exp_manager.explicit_log_dir={tmp_path / name}",
            "trainer.spin.max_iterations=1",
            "model.spin.length_params.max_length=8",
            "trainer.spin.mask_unfinished_generations=false",  # untrained: no generation ends
        ]
        main(compose_config(SCRIPTS / "conf", "gpt_spin", overrides + SCALE_DOWN))
        runs[name] = losses(tmp_path / name)
    assert runs["theirs"][0] == pytest.approx(math.log(2), abs=1e-6)
    # Their collate pads batches differently, so the trimmed widths differ: equal up to fp32 rounding.
    assert runs["theirs"] == pytest.approx(runs["ours"], rel=1e-5) and len(runs["theirs"]) == 2
    assert (tmp_path / "theirs" / "checkpoints" / "megatron_gpt_spin.nemo").is_file()


def test_preference_model_methods_match_ours():
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from tests.conftest import tiny_model_cfg

    model = MegatronGPTDPOModel(
        tiny_model_cfg(micro_batch_size=2, global_batch_size=2, dpo={"ref_policy_kl_penalty": 0.5})
    )
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert model.get_reduced_masked_logps(logps, mask).tolist() == [-5.0, -1.0]
    assert model.get_reduced_masked_logps(logps, mask, average_log_probs=True).tolist() == [-2.5, -0.5]
    chosen, rejected = model.gather_and_split_rewards(logps, torch.zeros_like(logps), mask)
    assert chosen.tolist() == [-2.5] and rejected.tolist() == [-0.5]  # beta 0.5 x the masked sums, one DP rank
    model.prepare_for_inference()
    assert not model.training
    model.finish_inference()
    assert model.training
    with pytest.raises(NotImplementedError, match="get_loss_and_metrics"):
        model.get_forward_output_and_loss_func()


def nemo_aligner_spin_batch(ours: dict) -> dict:
    """The SPIN batch NeMo-Aligner's ``augment_dataloader`` builds from the same pairs, built as it does: its
    ``create_mask`` marks positions ``prompt_length - 1`` up to ``length - 1`` (exclusive)."""

    def create_mask(tokens, prompt_lengths, lengths):
        mask = torch.zeros_like(tokens)
        for row, (start, end) in enumerate(zip(prompt_lengths.tolist(), lengths.tolist())):
            mask[row, start - 1 : end - 1] = 1
        return mask

    return {
        "actual": ours["chosen"],
        "generated": ours["rejected"],
        "actual_mask": create_mask(ours["chosen"], ours["prompt_lengths"], ours["chosen_lengths"]),
        "generated_mask": create_mask(ours["rejected"], ours["prompt_lengths"], ours["rejected_lengths"]),
        "generated_lengths": ours["rejected_lengths"] - ours["prompt_lengths"],
    }


def test_the_spin_batch_as_nemo_aligner_builds_it_gives_our_loss():
    """NeMo-Aligner's SPIN batch (actual/generated, its masks, per-token reference log-probs) is our pair batch:
    the same response tokens are scored, and the loss equals the one of our collate's batch of the same pairs."""
    from nemo_aligner.models.nlp.gpt.megatron_gpt_spin_model import MegatronGPTSPINModel
    from nemo_aligner.models.nlp.gpt.nemo_aligner_api import pairs_from_nemo_aligner_spin_batch
    from tests.conftest import tiny_model_cfg

    spin = {"ref_policy_kl_penalty": 0.5, "preference_loss": "dpo"}
    model = MegatronGPTSPINModel(tiny_model_cfg(micro_batch_size=2, global_batch_size=2, spin=spin))
    ours = DPOCollate(3)(PAIRS)
    theirs = nemo_aligner_spin_batch(ours)
    converted = pairs_from_nemo_aligner_spin_batch(theirs)
    assert torch.equal(converted["chosen_mask"], ours["chosen_mask"])
    assert torch.equal(converted["rejected_mask"], ours["rejected_mask"])
    # The reference model's per-token log-probs [2B, S-1] (NeMo-Aligner's get_ref_policy_logprobs), moved by a
    # per-token offset so that the loss depends on exactly which tokens each mask scores.
    per_token = model.get_ref_policy_logprobs(theirs).cpu()
    assert torch.equal(per_token, model.get_ref_policy_logprobs(ours).cpu())
    per_token = per_token - 0.1
    theirs["ref_policy_log_probs_actual"], theirs["ref_policy_log_probs_generated"] = per_token.split(2)
    chosen_sums, rejected_sums = model.get_logprob_sums(ours)
    counts = {side: ours[f"{side}_mask"].sum(1) for side in ("chosen", "rejected")}  # 3 and 1, 1 and 4 tokens
    ours["ref_chosen_logps"] = chosen_sums.cpu() - 0.1 * counts["chosen"]
    ours["ref_rejected_logps"] = rejected_sums.cpu() - 0.1 * counts["rejected"]
    loss, metrics = model.get_loss_and_metrics(theirs, forward_only=True)
    expected, expected_metrics = model.get_loss_and_metrics(ours, forward_only=True)
    assert loss == pytest.approx(expected, abs=1e-6) and loss != pytest.approx(math.log(2), abs=1e-3)
    assert metrics["rewards_actual_mean"] == pytest.approx(expected_metrics["rewards_actual_mean"], abs=1e-6)
    # by hand: the logged reward of a pair side (unscaled by beta, as NeMo-Aligner logs it) is 0.1 x its scored tokens
    assert metrics["rewards_actual_mean"] == pytest.approx(0.1 * (3 + 1) / 2, abs=1e-5)


def test_trainer_step_methods_return_loss_and_metrics(tmp_path):
    """train_single_step / validation_step return (loss, metrics) as NeMo-Aligner's do; on the first step the DPO
    loss is exactly log 2 (policy = reference), and the step updates the weights."""
    from types import SimpleNamespace

    from nemo_aligner.algorithms.dpo import DPOTrainer
    from nemo_aligner.models.nlp.gpt.megatron_gpt_dpo_model import MegatronGPTDPOModel
    from tests.conftest import tiny_model_cfg

    model = MegatronGPTDPOModel(
        tiny_model_cfg(micro_batch_size=2, global_batch_size=2, dpo={"ref_policy_kl_penalty": 0.5})
    )
    optim = {"name": "adamw", "lr": 1e-2, "sched": {"name": "Constant"}}
    optimizer, scheduler = model.setup_optimization(optim, max_steps=4, gradient_clip_val=1.0)
    loader = SimpleNamespace(batch_sampler=SimpleNamespace(global_batch_size=2, steps_per_epoch=1))
    trainer = DPOTrainer(
        {"max_epochs": 1, "max_steps": 1},
        model,
        train_dataloader=loader,
        val_dataloader=None,
        optimizer=optimizer,
        scheduler=scheduler,
    )
    batch = DPOCollate(3)(PAIRS)
    before = model.model_state_dict_in_cpu()
    loss, metrics = trainer.train_single_step(batch)
    assert loss == pytest.approx(math.log(2), abs=1e-6) and metrics["loss"] == loss and "lr" in metrics
    assert any(not torch.equal(before[k], v) for k, v in model.model_state_dict_in_cpu().items())
    loss, metrics = trainer.validation_step(batch)
    model.eval()
    expected = model.get_loss_and_metrics(batch, forward_only=True)
    model.train()
    assert (loss, metrics) == expected and model.training


def test_iterative_trainer_names_are_refused_or_ours():
    """augment_dataloader / get_generations / train_single_step_sft say what to use; train_single_step_dpo is
    train_single_step; get_elo_scores is our Bradley-Terry fit over NeMo-Aligner's verdict order."""
    from nemo_aligner.algorithms.self_rewarding import SelfRewardingTrainer
    from nemo_aligner.algorithms.spin import SPINTrainer
    from nemo_aligner.judges.meta import bradley_terry_elo

    trainer = object.__new__(SelfRewardingTrainer)  # the methods under test read nothing of a built trainer
    for name, hint in (
        ("augment_dataloader", "run_rollout"),
        ("get_generations", "model.generate"),
        ("train_single_step_sft", "first_iteration_sft"),
    ):
        with pytest.raises(NotImplementedError, match=hint):
            getattr(trainer, name)(None)
    with pytest.raises(NotImplementedError, match="run_rollout"):
        object.__new__(SPINTrainer).augment_dataloader(None)
    trainer.train_single_step = lambda batch: (0.25, {"loss": 0.25, "batch": batch})
    assert trainer.train_single_step_dpo("b") == (0.25, {"loss": 0.25, "batch": "b"})

    # 3 judgements; pairs (0,1), (0,2), (1,2), each verdict with the first shown as A, then swapped.
    verdicts = ["A", "B", "A", "B", "A", "A", "next"]
    elo = SelfRewardingTrainer.get_elo_scores(3, 6, verdicts)
    assert verdicts == ["next"]  # the six were taken off the front
    expected = bradley_terry_elo(3, [(0, 1, "A"), (1, 0, "B"), (0, 2, "A"), (2, 0, "B"), (1, 2, "A"), (2, 1, "A")])
    assert elo.tolist() == pytest.approx(expected.tolist())
    assert elo[0] > elo[1] == pytest.approx(elo[2])  # 0 beats both in both orders; 1 and 2 tie (position bias)
