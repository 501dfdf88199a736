"""NeMo-Aligner's configs port key for key: every key of its gpt_sft / gpt_dpo / gpt_spin / gpt_self_rewarding YAMLs
(recorded with their provenance in data/nemo_aligner_configs.json) composes in ours; keys without an effect here
warn when set; a ``+key`` no code reads is reported."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from nemo_aligner.data.nlp.builders import build_collate
from nemo_aligner.data.nlp.loading import SPLIT_DEFAULTS
from nemo_aligner.tokenizers import ByteLevelTokenizer
from nemo_aligner.utils.config import _config_name_and_overrides, compose_config
from nemo_aligner.utils.config_keys import NO_EFFECT, SPLIT_KEYS_READ, apply_aliases, key_paths, warn_no_effect
from nemo_aligner.utils.config_validation import ConfigError

CONF = Path(__file__).resolve().parents[2] / "examples" / "nlp" / "gpt" / "conf"
RECORDED = json.loads((Path(__file__).parent / "data" / "nemo_aligner_configs.json").read_text())["configs"]
OUR_CONFIG = {"sft": "gpt_sft", "dpo": "gpt_dpo", "spin": "gpt_spin", "self_rewarding": "gpt_self_rewarding"}
ALGORITHMS = sorted(OUR_CONFIG)


def hydra_value(value) -> str:
    """A recorded value as the right-hand side of a Hydra ``key=value`` override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def portable(value) -> bool:
    """Values a command line would set: not interpolations, mandatory markers or prose recorded by hash."""
    if isinstance(value, dict) or value == "???":
        return False
    return not (isinstance(value, str) and ("${" in value or any(ord(c) < 32 and c != "\n" for c in value)))


def test_the_recorded_lists_hold_463_keys_with_their_provenance():
    assert sum(len(entry["keys"]) for entry in RECORDED.values()) == 463
    for entry in RECORDED.values():
        assert entry["repo"] == "NVIDIA/NeMo-Aligner" and len(entry["commit"]) == 40
        assert entry["path"].endswith(".yaml") and entry["branch"]
    assert RECORDED["self_rewarding"]["branch"] == "degert/self-rewarding-trt"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_nemo_aligner_key_composes_with_its_nemo_aligner_value(algorithm):
    recorded = RECORDED[algorithm]["keys"]
    ours = key_paths(OmegaConf.to_container(compose_config(CONF, OUR_CONFIG[algorithm]), resolve=False))
    assert sorted(set(recorded) - ours) == []  # a plain key=value (no +) of each composes
    overrides = [f"{key}={hydra_value(value)}" for key, value in recorded.items() if portable(value)]
    assert len(overrides) > 0.7 * len(recorded)
    cfg = compose_config(CONF, OUR_CONFIG[algorithm], overrides)
    for key, value in recorded.items():
        if portable(value):
            assert OmegaConf.select(cfg, key) == value, key


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_our_defaults_warn_about_nothing(algorithm, caplog):
    cfg = compose_config(CONF, OUR_CONFIG[algorithm])
    with caplog.at_level(logging.WARNING, logger="nemo_aligner"):
        assert warn_no_effect(cfg) == []
    assert caplog.records == []


def test_each_key_without_effect_warns_once_naming_itself_and_why(caplog):
    configs = {name: compose_config(CONF, name) for name in OUR_CONFIG.values()}
    covered = set()
    for cfg in configs.values():
        present = [key for key in NO_EFFECT if OmegaConf.select(cfg, key, default="<absent>") != "<absent>"]
        for key in present:
            changed = cfg.copy()
            parent, _, leaf = key.rpartition(".")
            with open_dict(changed):
                (OmegaConf.select(changed, parent) if parent else changed)[leaf] = "something else"
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="nemo_aligner"):
                warned = warn_no_effect(changed)
            # the key itself, and keys that interpolate it (validation_ds.memmap_workers: ${...train_ds...})
            assert key in warned
            assert all("${" in str(_raw(changed, other)) for other in warned if other != key)
            messages = [r.getMessage() for r in caplog.records]
            assert len(messages) == len(warned)
            (message,) = [m for m in messages if m.startswith(f"{key}=")]
            assert message.startswith(f"{key}=something else has no effect here") and NO_EFFECT[key][1] in message
            covered.add(key)
    assert covered == set(NO_EFFECT)  # every registered key is one of the YAMLs'


def _raw(cfg, key: str):
    """The value of ``key`` as written (an interpolation stays ``${...}``)."""
    parent, _, leaf = key.rpartition(".")
    return OmegaConf.to_container(OmegaConf.select(cfg, parent), resolve=False)[leaf]


def test_top_level_trainer_limits_and_model_resume_are_aliases():
    cfg = compose_config(CONF, "gpt_sft_tiny", ["trainer.max_steps=7", "trainer.max_epochs=2"])
    OmegaConf.resolve(cfg)
    apply_aliases(cfg, "sft")
    assert (cfg.trainer.sft.max_steps, cfg.trainer.sft.max_epochs) == (7, 2)
    unchanged = compose_config(CONF, "gpt_dpo", ["trainer.dpo.max_steps=5"])
    OmegaConf.resolve(unchanged)
    apply_aliases(unchanged, "dpo")
    assert unchanged.trainer.dpo.max_steps == unchanged.trainer.max_steps == 5

    cfg = compose_config(CONF, "gpt_sft_tiny", ["model.resume_from_checkpoint=/ckpt/a"])
    apply_aliases(cfg, "sft")
    assert cfg.exp_manager.resume_from_checkpoint == "/ckpt/a"
    both = compose_config(
        CONF, "gpt_sft_tiny", ["model.resume_from_checkpoint=/ckpt/a", "exp_manager.resume_from_checkpoint=/ckpt/b"]
    )
    with pytest.raises(ConfigError, match="model.resume_from_checkpoint=/ckpt/a and exp_manager"):
        apply_aliases(both, "sft")


@pytest.mark.parametrize("name", ["gpt_sft", "gpt_dpo", "gpt_spin", "gpt_self_rewarding"])
def test_trainer_max_time_is_the_run_time_limit(name):
    cfg = compose_config(CONF, name, ["trainer.max_time=00:01:30:00"])
    assert cfg.exp_manager.max_time_per_run == "00:01:30:00"


def test_an_added_key_no_code_reads_is_an_error_naming_it():
    with pytest.raises(ConfigError) as info:
        compose_config(CONF, "gpt_sft_tiny", ["+trainer.sft.max_stpes=3", "++model.optim.weight_decy=0.1"])
    message = str(info.value)
    assert (
        "trainer.sft.max_stpes: no code reads this key" in message and "did you mean trainer.sft.max_steps" in message
    )
    assert "model.optim.weight_decy" in message and "model.optim.weight_decay" in message
    with pytest.raises(ConfigError, match=r"trainer\.dpo\.frobnicate: no code reads this key"):
        compose_config(CONF, "gpt_dpo", ["+trainer.dpo.frobnicate=1"])


def test_added_keys_that_are_read_compose_quietly(caplog):
    with caplog.at_level(logging.WARNING, logger="nemo_aligner"):
        cfg = compose_config(
            CONF,
            "gpt_self_rewarding",
            [
                "++model.micro_batch_size=2",  # a key of the YAML
                "++model.apply_rope_fusion=false",  # a model-config key the model reads
                "+exp_manager.wandb_logger_kwargs.entity=team",  # passed on to W&B
                "++model.data.skip_warmup=true",  # a NeMo-Aligner key (accepted; see NO_EFFECT)
                "~model.optim.sched",  # a section replaced (NeMo's idiom): its keys stay known
                "+model.optim.sched.name=Constant",
            ],
        )
    assert caplog.records == []
    assert cfg.model.micro_batch_size == 2 and cfg.model.apply_rope_fusion is False
    assert dict(cfg.model.optim.sched) == {"name": "Constant"}


@pytest.mark.parametrize("name", ["gpt_sft", "gpt_spin", "gpt_self_rewarding"])
def test_every_split_key_read_with_a_default_is_in_the_yaml_or_known(name):
    cfg = compose_config(CONF, name, [])
    for split in ("train_ds", "validation_ds"):
        assert set(SPLIT_DEFAULTS) - set(cfg.model.data[split]) <= SPLIT_KEYS_READ, split


def test_a_data_split_key_with_a_default_can_be_added():
    # The SFT YAMLs leave pad_length_to_multiple_of out (its default is None); the collate reads it per split.
    cfg = compose_config(CONF, "gpt_sft_tiny", ["++model.data.train_ds.pad_length_to_multiple_of=16"])
    assert build_collate(cfg.model.data.train_ds, ByteLevelTokenizer()).pad_length_to_multiple_of == 16
    with pytest.raises(ConfigError, match=r"model\.data\.train_ds\.pad_length_to_multiple_of: no code reads"):
        compose_config(CONF, "gpt_dpo", ["++model.data.train_ds.pad_length_to_multiple_of=16"])  # DPO: data_prefix


def test_an_unknown_model_config_key_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="nemo_aligner"):
        cfg = compose_config(CONF, "gpt_dpo", ["+model.dist_ckpt_format=torch_dist"])
    assert cfg.model.dist_ckpt_format == "torch_dist"
    (message,) = [r.getMessage() for r in caplog.records]
    assert "model.dist_ckpt_format" in message and "no effect" in message


def test_command_line_config_name_and_overrides():
    argv = ["--config-name", "gpt_spin_tiny", "a.b=1", "+c=2", "-m", "--config-path=x", "++d.e=f=g", "hydra.run.dir=."]
    assert _config_name_and_overrides(argv, "gpt_spin") == ("gpt_spin_tiny", ["a.b=1", "+c=2", "++d.e=f=g"])
    assert _config_name_and_overrides(["--config-name=gpt_sft_tiny"], "gpt_sft") == ("gpt_sft_tiny", [])
    # A deletion has no "=" and must still reach the +key check, in its place (it changes what the file holds).
    argv = ["~model.optim.sched", "+model.optim.sched.name=Constant"]
    assert _config_name_and_overrides(argv, "gpt_sft") == ("gpt_sft", argv)


# The defaults a ported command relies on (issue 15, point 4): equal to NeMo-Aligner's.
SPIN_PORTED_DEFAULTS = [
    "trainer.precision",
    "model.megatron_amp_O2",
    "exp_manager.checkpoint_callback_params.save_top_k",
    "model.optim.lr",
    "model.optim.weight_decay",
    "model.optim.sched.min_lr",
]
PORTED_DEFAULTS = {
    "sft": [
        "trainer.precision",
        "model.megatron_amp_O2",
        "model.optim.name",
        "model.optim.lr",
        "trainer.sft.max_steps",
        "trainer.sft.max_epochs",
        "model.data.train_ds.global_batch_size",
        "model.data.train_ds.micro_batch_size",
        "model.data.chat",
        "model.data.train_ds.add_eos",
        "exp_manager.checkpoint_callback_params.save_top_k",
    ],
    "dpo": ["trainer.precision", "model.megatron_amp_O2", "exp_manager.checkpoint_callback_params.save_top_k"],
    "spin": SPIN_PORTED_DEFAULTS,
    "self_rewarding": [
        *SPIN_PORTED_DEFAULTS,
        "model.spin.log_prob_forward_micro_batch_size",
        "model.spin.normalise_prompt",
    ],
}
DOC = Path(__file__).resolve().parents[2] / "docs" / "coming_from_nemo_aligner.md"


def resolved_values(algorithm: str) -> dict:
    """key -> (NeMo-Aligner's value, ours), both resolved; keys whose recorded value cannot resolve alone (it
    interpolates a key its file leaves commented out) or that are mandatory (``???``) are left out."""
    theirs = OmegaConf.create({})
    for key, value in RECORDED[algorithm]["keys"].items():
        OmegaConf.update(theirs, key, value, force_add=True)
    ours = compose_config(CONF, OUR_CONFIG[algorithm])
    values = {}
    for key in RECORDED[algorithm]["keys"]:
        try:
            theirs_value = _plain_resolved(OmegaConf.select(theirs, key, throw_on_missing=True))
        except Exception:  # noqa: BLE001 - an interpolation of a key NeMo-Aligner's file does not hold, or ???
            continue
        values[key] = (theirs_value, _plain_resolved(OmegaConf.select(ours, key)))
    return values


def _plain_resolved(value):
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_the_defaults_a_ported_command_relies_on_are_nemo_aligners(algorithm):
    values = resolved_values(algorithm)
    for key in PORTED_DEFAULTS[algorithm]:
        theirs, ours = values[key]
        assert ours == theirs, f"{key}: ours {ours!r}, NeMo-Aligner's {theirs!r}"


def test_every_remaining_difference_is_documented_with_its_reason():
    text = DOC.read_text()
    section = text[text.index("Values that still differ from NeMo-Aligner's") : text.index("Kept on purpose")]
    undocumented = []
    for algorithm in ALGORITHMS:
        for key, (theirs, ours) in resolved_values(algorithm).items():
            if theirs != ours and not any(
                f"{part}`" in section or f"{part}," in section for part in key.split(".")[-2:]
            ):
                undocumented.append(f"{algorithm}: {key} ({theirs!r} there, {ours!r} here)")
    assert undocumented == []
    assert "exp_manager.name" in section and "megatron_gpt.nemo" in section  # the final model's name
