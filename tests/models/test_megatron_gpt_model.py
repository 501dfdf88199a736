"""MegatronGPTModel: NeMo-written checkpoints, every architecture option, log-probs, .nemo I/O, training."""

from __future__ import annotations

import shutil
import tarfile

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.checkpoint.nemo_file import NemoFormatError
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.utils.logprobs import shifted_logprobs
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo
from tests.conftest import NEMO_FIXTURE_NAMES, NEMO_FIXTURES, perturb_, tiny_model_cfg, tolerance
from tests.models.reference_gpt import reference_logits


def _state_equal(a: MegatronGPTModel, b: MegatronGPTModel) -> None:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if isinstance(sa[key], torch.Tensor):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("name", NEMO_FIXTURE_NAMES)
def test_reads_nemo_written_files_and_reproduces_nemo_logits(name):
    expected = torch.load(NEMO_FIXTURES / f"{name}.expected.pt", weights_only=True)
    model = MegatronGPTModel.restore_from(NEMO_FIXTURES / f"{name}.nemo").eval()
    with torch.no_grad():
        logits = model(expected["input_ids"], expected["position_ids"]).cpu()
    assert logits.shape == expected["logits"].shape
    # NeMo's own reader reproduced these within 1.1e-6 (fixture README); 1e-5 is the tolerance.
    assert (logits - expected["logits"]).abs().max().item() <= tolerance(1e-5)
    assert model.padded_vocab_size == expected["padded_vocab_size"]
    assert model.tokenizer.vocab_size == expected["tokenizer_vocab_size"]


ARCHITECTURES = {
    "llama_gqa_rope_rmsnorm_swiglu_untied": {},
    "gpt2_layernorm_gelu_learned_tied_bias": dict(
        normalization="layernorm",
        activation="gelu",
        position_embedding_type="learned_absolute",
        share_embeddings_and_output_weights=True,
        bias=True,
        num_query_groups=None,
    ),
    "nemotron_layernorm1p_squared_relu_partial_rope": dict(
        normalization="layernorm1p", activation="squared-relu", rotary_percentage=0.5, rotary_base=500000, bias=False
    ),
    "gpt2b_layernorm1p_swiglu_partial_rope": dict(
        normalization="layernorm1p", activation="swiglu", rotary_percentage=0.5, num_query_groups=None
    ),
    "qwen2_qkv_bias": dict(bias=False, qkv_bias=True),
}


@pytest.mark.parametrize("overrides", ARCHITECTURES.values(), ids=ARCHITECTURES.keys())
def test_architecture_matches_independent_reference_forward(overrides):
    cfg = tiny_model_cfg(**overrides)
    model = MegatronGPTModel(cfg).eval()
    perturb_(model)
    input_ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids).cpu()
    expected = reference_logits(model.model_state_dict_in_cpu(), cfg, input_ids)
    # fp32 model vs float64 reference: differences are rounding only (observed ~1e-6).
    assert (logits.double() - expected).abs().max().item() < tolerance(1e-4, 1e-3)


@pytest.mark.parametrize("o2", [True, False], ids=["O2_bf16_weights", "mixed_fp32_weights"])
def test_bf16_parameters_and_forward(o2):
    cfg = tiny_model_cfg(precision="bf16", megatron_amp_O2=o2)
    model = MegatronGPTModel(cfg).eval()
    assert all(p.dtype == (torch.bfloat16 if o2 else torch.float32) for p in model.parameters())
    perturb_(model)
    input_ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(input_ids).cpu()
    expected = reference_logits(model.model_state_dict_in_cpu(), cfg, input_ids)
    # bf16 keeps 8 bits of mantissa; logits of size ~1 agree to a few 1e-2.
    assert logits.dtype == torch.bfloat16
    assert (logits.double() - expected).abs().max().item() < 0.1


def test_logprobs_equal_log_softmax_of_full_logits():
    model = MegatronGPTModel(tiny_model_cfg()).eval()
    perturb_(model)
    input_ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids).cpu()
        logprobs = model.get_logprobs(input_ids).cpu()
    by_hand = torch.log_softmax(logits.double(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    assert logprobs.shape == (3, 19)
    assert (logprobs.double() - by_hand).abs().max().item() < tolerance(1e-5)
    # The in-place vocab-parallel kernel must not touch the caller's logits.
    on_device = model(input_ids).detach()
    assert torch.equal(shifted_logprobs(on_device, input_ids.to(on_device.device)).cpu(), logprobs)
    assert torch.equal(logits, on_device.cpu())


@pytest.mark.parametrize("packed", [True, False], ids=["tar", "directory"])
def test_nemo_round_trip_is_bit_exact(tmp_path, packed):
    model = MegatronGPTModel(tiny_model_cfg(tokenizer={"library": "byte-level", "special_tokens": ["<extra_id_1>"]}))
    perturb_(model)
    path = tmp_path / ("model.nemo" if packed else "model_dir")
    model.save_to(path, packed=packed)
    assert (path.is_file() and tarfile.is_tarfile(path)) == packed
    restored = MegatronGPTModel.restore_from(path)
    _state_equal(model, restored)
    assert restored.tokenizer.text_to_ids("<extra_id_1>") == model.tokenizer.text_to_ids("<extra_id_1>")
    # Saving the restored model again gives the same tensors again.
    restored.save_to(tmp_path / "again.nemo")
    _state_equal(model, MegatronGPTModel.restore_from(tmp_path / "again.nemo"))


def test_sentencepiece_artifact_travels_through_save_and_restore(tmp_path):
    name = "tiny_gpt_ln_gelu_abs"
    model = MegatronGPTModel.restore_from(NEMO_FIXTURES / f"{name}.nemo")
    model.save_to(tmp_path / "copy.nemo")
    with tarfile.open(tmp_path / "copy.nemo") as tar:
        names = tar.getnames()
    artifacts = [n for n in names if n.endswith("_tok.model")]
    assert len(artifacts) == 1 and len(artifacts[0].split("/")[-1]) == 32 + 1 + len("tok.model")
    copy = MegatronGPTModel.restore_from(tmp_path / "copy.nemo")
    text = "the small model reads the old book"
    assert copy.tokenizer.text_to_ids(text) == model.tokenizer.text_to_ids(text)
    _state_equal(model, copy)


def test_legacy_o2_checkpoint_loads_with_module_prefix(tmp_path):
    cfg = tiny_model_cfg(megatron_amp_O2=True)
    model = MegatronGPTModel(cfg)
    perturb_(model)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    OmegaConf.save(OmegaConf.create(cfg), legacy / "model_config.yaml")
    weights = {k.replace("model.", "model.module.", 1): v for k, v in model.model_state_dict_in_cpu().items()}
    torch.save(weights, legacy / "model_weights.ckpt")
    _state_equal(model, MegatronGPTModel.restore_from(legacy))


def test_load_from_nemo_merges_user_overrides_over_checkpoint_config():
    path = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    cfg = load_and_override_model_config(path, {"micro_batch_size": 7, "hidden_dropout": 0.0})
    assert cfg.micro_batch_size == 7 and cfg.hidden_size == 64 and "target" not in cfg
    model, used_cfg = load_from_nemo(MegatronGPTModel, cfg, restore_path=path, return_updated_cfg=True)
    assert used_cfg.micro_batch_size == 7 and model.cfg.num_query_groups == 2


def test_training_with_megatron_optimizer_lowers_the_loss():
    model = MegatronGPTModel(tiny_model_cfg())
    optim = {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {"name": "Constant"}}
    model.setup_optimization(optim, max_steps=12, gradient_clip_val=1.0)
    data = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(4))

    def forward_step(chunk, batch):
        output = chunk(
            input_ids=batch,
            position_ids=torch.arange(batch.shape[1], device=batch.device)[None].expand_as(batch),
            attention_mask=torch.triu(torch.ones(32, 32, dtype=torch.bool, device=batch.device), 1)[None, None],
        )

        def loss_func(logits):
            token_logprobs = shifted_logprobs(logits, batch)
            total = -token_logprobs.sum()
            return (
                total,
                torch.tensor(token_logprobs.numel(), device=batch.device),
                {"sum": total.detach(), "count": token_logprobs.numel()},
            )

        return output, loss_func

    losses = []
    for _ in range(12):
        model.zero_grad_buffers()
        metrics = model.forward_backward([data[:2], data[2:]], 2, forward_step, False, 32, 2)
        updated, grad_norm = model.optimizer_step()
        assert updated and grad_norm > 0
        losses.append(sum(m["sum"] for m in metrics).item() / sum(m["count"] for m in metrics))
    assert losses[-1] < losses[0] - 1.0, losses


def test_missing_and_truncated_files_fail_with_one_clear_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist.nemo"):
        MegatronGPTModel.restore_from(tmp_path / "does_not_exist.nemo")
    source = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    data = source.read_bytes()
    (tmp_path / "truncated.nemo").write_bytes(data[: len(data) // 2])
    with pytest.raises(NemoFormatError, match="truncated"):
        MegatronGPTModel.restore_from(tmp_path / "truncated.nemo")


def test_config_that_does_not_fit_the_weights_is_reported(tmp_path):
    path = NEMO_FIXTURES / "tiny_gpt_rms_swiglu_rope_gqa.nemo"
    cfg = load_and_override_model_config(path, {"ffn_hidden_size": 96})
    with pytest.raises(NemoFormatError, match="do not fit the model"):
        MegatronGPTModel.restore_from(path, override_config_path=cfg)


def test_unsupported_architecture_values_name_the_key():
    with pytest.raises(ValueError, match="model.activation='tanh'"):
        MegatronGPTModel(tiny_model_cfg(activation="tanh"))
    with pytest.raises(ValueError, match="model.normalization"):
        MegatronGPTModel(tiny_model_cfg(normalization="batchnorm"))


def test_unpacked_directory_is_accepted(tmp_path):
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    with tarfile.open(NEMO_FIXTURES / "tiny_gpt_ln_swiglu_rope50.nemo") as tar:
        tar.extractall(unpacked, filter="data")
    from_dir = MegatronGPTModel.restore_from(unpacked)
    _state_equal(from_dir, MegatronGPTModel.restore_from(NEMO_FIXTURES / "tiny_gpt_ln_swiglu_rope50.nemo"))
    shutil.rmtree(unpacked)


def test_user_config_replaces_checkpoint_values_of_another_kind():
    """A NeMo checkpoint's pretraining ``data.data_prefix`` is a list; a DPO config's is a mapping: the user's wins."""
    from omegaconf import OmegaConf

    from nemo_aligner.utils.utils import merge_over_checkpoint_config

    checkpoint = OmegaConf.create(
        {"hidden_size": 64, "data": {"data_prefix": [], "seq_length": 64}, "optim": {"lr": 1}}
    )
    user = {"data": {"data_prefix": {"train": ["a.jsonl"]}}, "optim": {"lr": 2, "name": "adamw"}}
    merged = merge_over_checkpoint_config(checkpoint, user)
    assert merged.data.data_prefix.train == ["a.jsonl"] and merged.data.seq_length == 64
    assert merged.optim == {"lr": 2, "name": "adamw"} and merged.hidden_size == 64


def test_the_model_is_built_inside_the_launchers_parallel_state_and_never_sets_it_up():
    """megatron-core leaves parallel state to the launcher: without it the constructor stops with a message naming
    the launcher's call; with other sizes than the config's it stops too; it never (re-)initialises anything."""
    from megatron.core import parallel_state

    from nemo_aligner.utils.distributed import initialize_distributed

    with pytest.raises(RuntimeError, match=r"tensor/pipeline parallel sizes \(2, 1\) .* initialised with \(1, 1\)"):
        MegatronGPTModel(tiny_model_cfg(tensor_model_parallel_size=2, num_query_groups=4))
    assert parallel_state.get_tensor_model_parallel_world_size() == 1  # untouched
    parallel_state.destroy_model_parallel()
    try:
        with pytest.raises(RuntimeError, match=r"parallel state is not initialised: the launcher sets it up"):
            MegatronGPTModel(tiny_model_cfg())
        assert not parallel_state.model_parallel_is_initialized()
    finally:
        initialize_distributed()
