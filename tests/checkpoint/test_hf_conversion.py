"""HF <-> NeMo conversion: config and weight mapping, logits against ``transformers``, and the two CLI scripts.

Tiny random models (2 layers, hidden 64, 4 heads in 2 query groups) are built once per module. Their weights,
norms and biases included, get extra noise so a mis-mapped tensor cannot hide behind an init value of 0 or 1.
Logit tolerance 1e-4: both sides run in float32 and differ only in the order of the same operations (seen: ~1e-6).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nemo_aligner.checkpoint.hf_conversion import (
    hf_config_from_nemo,
    hf_state_dict_from_nemo,
    nemo_config_from_hf,
    nemo_state_dict_from_hf,
)
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel

VOCAB = 256
LOGIT_ATOL = 1e-4
SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "checkpoint_converters"
TINY = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    num_hidden_layers=2,
    vocab_size=VOCAB,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    dtype="float32",
)
MODELS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(tie_word_embeddings=False, rope_theta=50000.0)),
    "llama_linear_rope": (
        LlamaForCausalLM,
        LlamaConfig,
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 20000.0}),
    ),
    "qwen2_tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True, rope_theta=30000.0)),
}
# HF config fields a NeMo round trip must keep.
CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "hidden_act",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "dtype",
)


class StubTokenizer:
    vocab_size = VOCAB


def _tiny_hf_model(name: str) -> torch.nn.Module:
    model_cls, config_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**TINY, **extra)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def _hf_config_dict(model: torch.nn.Module) -> dict:
    """What ``config.json`` holds (``architectures`` is added by save_pretrained)."""
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


@pytest.fixture(scope="module")
def converted() -> dict[str, tuple[torch.nn.Module, dict, MegatronGPTModel]]:
    """For each tiny HF model: the model, its NeMo config, and a MegatronGPTModel holding the converted weights."""
    out = {}
    for name in MODELS:
        hf_model = _tiny_hf_model(name)
        cfg = nemo_config_from_hf(_hf_config_dict(hf_model))
        nemo_model = MegatronGPTModel(cfg, tokenizer=StubTokenizer()).eval()
        nemo_model.load_model_state_dict(nemo_state_dict_from_hf(hf_model.state_dict(), cfg))
        out[name] = (hf_model, cfg, nemo_model)
    return out


def _right_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three prompts of lengths 16, 11 and 5, right padded with id 0."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 16), generator=generator)
    lengths = torch.tensor([16, 11, 5])
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    return input_ids * mask, mask


def _max_logit_diff(hf_model: torch.nn.Module, nemo_model: MegatronGPTModel) -> float:
    input_ids, mask = _right_padded_batch()
    with torch.no_grad():
        expected = hf_model(input_ids=input_ids, attention_mask=mask).logits
        actual = nemo_model(input_ids)
    assert actual.shape == expected.shape
    return (actual - expected)[mask.bool()].abs().max().item()


@pytest.mark.parametrize("name", list(MODELS))
def test_converted_logits_match_transformers(converted, name):
    hf_model, _, nemo_model = converted[name]
    assert _max_logit_diff(hf_model, nemo_model) < LOGIT_ATOL


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_gives_back_the_hf_weights_and_config(converted, name):
    hf_model, cfg, nemo_model = converted[name]
    back = hf_state_dict_from_nemo(nemo_model.model_state_dict_in_cpu(), cfg, VOCAB)
    original = hf_model.state_dict()
    if cfg["share_embeddings_and_output_weights"]:
        original.pop("lm_head.weight")  # tied: save_pretrained does not write it either
    assert sorted(back) == sorted(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key

    hf_config = hf_model.config
    exported = hf_config_from_nemo(cfg, VOCAB, hf_config.bos_token_id, hf_config.eos_token_id)
    assert exported["architectures"] == [type(hf_model).__name__]
    reloaded = type(hf_config)(**exported)
    for field in CONFIG_FIELDS:
        assert getattr(reloaded, field) == getattr(hf_config, field), field
    # Qwen2 configs may leave head_dim out (then it is hidden_size / heads); the export always writes it.
    assert reloaded.head_dim == getattr(hf_config, "head_dim", hf_config.hidden_size // hf_config.num_attention_heads)


def test_padded_vocab_rows_are_zero_and_dropped_on_export(converted):
    hf_model, cfg, _ = converted["llama"]
    nemo_sd = nemo_state_dict_from_hf(hf_model.state_dict(), cfg, padded_vocab=VOCAB + 4)
    for key in ("model.embedding.word_embeddings.weight", "model.output_layer.weight"):
        assert nemo_sd[key].shape[0] == VOCAB + 4
        assert not nemo_sd[key][VOCAB:].any()
    back = hf_state_dict_from_nemo(nemo_sd, cfg, VOCAB)
    assert torch.equal(back["lm_head.weight"], hf_model.state_dict()["lm_head.weight"])


def test_qkv_is_interleaved_per_query_group(converted):
    """Megatron's layout: for each group, its heads' q rows, then its k rows, then its v rows."""
    hf_model, cfg, _ = converted["qwen2_tied"]
    hf_sd = hf_model.state_dict()
    qkv = nemo_state_dict_from_hf(hf_sd, cfg)["model.decoder.layers.1.self_attention.linear_qkv.bias"]
    q, k, v = (hf_sd[f"model.layers.1.self_attn.{n}_proj.bias"] for n in "qkv")
    d = 16  # head dim; 2 query heads per group
    group1 = qkv[4 * d :]
    assert torch.equal(group1[: 2 * d], q[2 * d :])
    assert torch.equal(group1[2 * d : 3 * d], k[d:])
    assert torch.equal(group1[3 * d :], v[d:])


@pytest.mark.parametrize(
    ("hf_vocab", "tokenizer_vocab", "divisor"),
    [(256, 256, 1), (256, 250, 8), (151936, 151646, 1187), (32001, 32001, 1)],
)
def test_vocab_divisor_keeps_the_hf_vocab_size(converted, hf_vocab, tokenizer_vocab, divisor):
    hf_config = {**_hf_config_dict(converted["llama"][0]), "vocab_size": hf_vocab}
    assert nemo_config_from_hf(hf_config, tokenizer_vocab)["make_vocab_size_divisible_by"] == divisor


def test_config_mapping_of_legacy_keys_and_sliding_window(converted):
    base = _hf_config_dict(converted["llama"][0])
    base.pop("rope_parameters")
    legacy = {**base, "rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 4.0}, "torch_dtype": "bfloat16"}
    legacy.pop("dtype")
    cfg = nemo_config_from_hf(legacy)
    assert (cfg["rotary_base"], cfg["seq_len_interpolation_factor"], cfg["precision"]) == (1e6, 4.0, "bf16")
    mistral = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 32}
    cfg = nemo_config_from_hf(mistral)
    assert (cfg["encoder_seq_length"], cfg["max_position_embeddings"], cfg.get("qkv_bias")) == (32, 128, None)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}}, "'llama3'"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_size": None}, "'hidden_size' is missing"),
    ],
)
def test_unsupported_hf_configs_are_refused(converted, change, message):
    with pytest.raises(ValueError, match=message):
        nemo_config_from_hf({**_hf_config_dict(converted["llama"][0]), **change}, VOCAB)


def test_tokenizer_larger_than_the_embedding_is_refused(converted):
    with pytest.raises(ValueError, match="no embedding rows"):
        nemo_config_from_hf(_hf_config_dict(converted["llama"][0]), VOCAB + 1)


def test_unexpected_hf_weights_are_refused(converted):
    hf_model, cfg, _ = converted["llama"]
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        nemo_state_dict_from_hf({**hf_model.state_dict(), "model.layers.2.mlp.up_proj.weight": torch.zeros(1)}, cfg)


# ------------------------------------------------------------------ CLI scripts


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def to_nemo():
    return _load_script("convert_llama_hf_to_nemo")


@pytest.fixture(scope="module")
def to_hf():
    return _load_script("convert_nemo_to_hf")


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly VOCAB ids: <unk>, <s>, </s>, then w3 ... w255."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_cli_round_trip_hf_to_nemo_to_hf(converted, to_nemo, to_hf, tmp_path):
    hf_model = converted["llama"][0]
    hf_dir, nemo_path, out_dir = tmp_path / "hf", tmp_path / "tiny.nemo", tmp_path / "hf_out"
    hf_model.save_pretrained(hf_dir)
    _tiny_tokenizer().save_pretrained(hf_dir)

    to_nemo.main(["--input_name_or_path", str(hf_dir), "--output_path", str(nemo_path)])
    restored = MegatronGPTModel.restore_from(nemo_path).eval()
    assert _max_logit_diff(hf_model, restored) < LOGIT_ATOL
    assert restored.tokenizer.text_to_ids("w5 w7") == [5, 7]

    to_hf.main(["--input_name_or_path", str(nemo_path), "--output_path", str(out_dir)])
    exported = LlamaForCausalLM.from_pretrained(out_dir).eval()
    for key, tensor in hf_model.state_dict().items():
        assert torch.equal(exported.state_dict()[key], tensor), key
    input_ids, mask = _right_padded_batch()
    with torch.no_grad():
        assert torch.equal(
            exported(input_ids, attention_mask=mask).logits, hf_model(input_ids, attention_mask=mask).logits
        )
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.encode("w5 w7", add_special_tokens=False)) == (
        "<s>",
        "</s>",
        [5, 7],
    )
    generation = json.loads((out_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.parametrize("layout", ["sharded_safetensors", "pytorch_model_bin"])
def test_cli_reads_sharded_safetensors_and_torch_bin(converted, to_nemo, tmp_path, layout):
    hf_model = converted["llama"][0]
    if layout == "sharded_safetensors":
        hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
        assert (tmp_path / "model.safetensors.index.json").is_file()
    else:
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    loaded = to_nemo.read_hf_state_dict(tmp_path)
    original = hf_model.state_dict()
    assert sorted(loaded) == sorted(original)
    assert all(torch.equal(loaded[key], tensor) for key, tensor in original.items())


def test_cli_errors_name_the_problem(converted, to_nemo, to_hf, tmp_path):
    cases = [
        (to_nemo, tmp_path / "missing", "no such local directory"),
        (to_nemo, tmp_path, "no config.json"),
        (to_hf, tmp_path / "missing.nemo", "no such .nemo file"),
    ]
    for script, path, message in cases:
        with pytest.raises(SystemExit, match=message):
            script.main(["--input_name_or_path", str(path), "--output_path", str(tmp_path / "out")])
    later_cases = [
        ({"architectures": ["GPT2LMHeadModel"]}, None, "GPT2LMHeadModel.*not supported"),
        ({"architectures": ["LlamaForCausalLM"]}, None, "no tokenizer.json or tokenizer.model"),
        (_hf_config_dict(converted["llama"][0]), _tiny_tokenizer(), "no weights; expected one of"),
    ]
    for config, tokenizer, message in later_cases:
        (tmp_path / "config.json").write_text(json.dumps(config))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_path)
        with pytest.raises(SystemExit, match=message):
            to_nemo.main(["--input_name_or_path", str(tmp_path), "--output_path", str(tmp_path / "out.nemo")])
