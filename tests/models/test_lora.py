"""LoRA on the megatron-core GPT: exact base model with adapters off, training, merging, checkpoints, TP=2."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import ColumnParallelLinear
from omegaconf import OmegaConf

from nemo_aligner.checkpoint import nemo_file
from nemo_aligner.checkpoint.trainer_checkpoint import load_checkpoint, save_checkpoint
from nemo_aligner.models.nlp.gpt.lora import (
    load_lora_adapters,
    lora_adapters,
    lora_block_spec,
    merge_lora_adapters,
    resolve_layer_selection,
    resolve_target_modules,
    save_lora_adapters,
)
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from nemo_aligner.models.nlp.gpt.model_config import layer_spec
from nemo_aligner.models.nlp.gpt.reference import lora_adapters_disabled
from nemo_aligner.utils.logprobs import shifted_logprobs
from nemo_aligner.utils.train_script_utils import configure_peft
from nemo_aligner.utils.utils import load_and_override_model_config, load_from_nemo
from tests.conftest import perturb_, tiny_model_cfg
from tests.distributed.multiprocess import restore_at_layout, run_distributed

IDS = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
ALL = ("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2")
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
OPTIM = {"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.98], "sched": {"name": "Constant"}}


def _base_model() -> MegatronGPTModel:
    """The tiny Llama-style model (SwiGLU, GQA) with every weight moved off its initial value."""
    model = MegatronGPTModel(tiny_model_cfg()).eval()
    perturb_(model)
    return model


def _peft(**tuning) -> dict:
    return {"peft_scheme": "lora", "lora_tuning": {"adapter_dim": 4, **tuning}}


def _with_lora(base: MegatronGPTModel, peft: dict) -> MegatronGPTModel:
    """A model built with the adapters of ``peft`` and ``base``'s weights (adapters from their seeded init)."""
    model = MegatronGPTModel({**tiny_model_cfg(), "peft": peft}).eval()
    model.load_model_state_dict(base.model_state_dict_in_cpu())
    return model


def _lora_from(path, peft: dict, **overrides) -> MegatronGPTModel:
    """A ``.nemo``'s base model built with the adapters of ``peft``."""
    cfg = load_and_override_model_config(path, {**overrides, "peft": peft})
    return restore_at_layout(MegatronGPTModel, cfg, path).eval()


def _logits(model: MegatronGPTModel, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def _trainable(model: MegatronGPTModel) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _perturb_adapters(model: MegatronGPTModel, seed: int) -> None:
    for adapter in lora_adapters(model).values():
        perturb_(adapter, seed)
        seed += 1


@pytest.mark.parametrize(
    ("targets", "layers", "expected_targets", "expected_layers"),
    [
        (["attention_qkv"], None, ("attention_qkv",), (1, 2, 3, 4)),
        (["attention"], [4, 1], ("attention_qkv", "attention_dense"), (1, 4)),
        (["mlp"], [2], ("mlp_fc1", "mlp_fc2"), (2,)),
        (["mlp_fc2", "attention_qkv"], [3, 3], ("attention_qkv", "mlp_fc2"), (3,)),
        ("attention_dense", [1, 2], ("attention_dense",), (1, 2)),
        (["all"], None, ALL, (1, 2, 3, 4)),
        (["attention", "mlp_fc1", "all"], [1, 2, 3, 4], ALL, (1, 2, 3, 4)),
    ],
)
def test_target_groups_and_layer_selection_resolve_as_nemo_does(targets, layers, expected_targets, expected_layers):
    assert resolve_target_modules(targets) == expected_targets
    assert resolve_layer_selection(layers, num_layers=4) == expected_layers


def test_bad_settings_name_their_key():
    with pytest.raises(ValueError, match=r"model\.peft\.lora_tuning\.target_modules: unknown target 'attention_q'"):
        resolve_target_modules(["attention_q"])
    for selection in ([0], [5], []):
        with pytest.raises(ValueError, match=r"model\.peft\.lora_tuning\.layer_selection"):
            resolve_layer_selection(selection, num_layers=4)
    with pytest.raises(ValueError, match=r"model\.peft\.peft_scheme='ptuning'"):
        MegatronGPTModel({**tiny_model_cfg(), "peft": {"peft_scheme": "ptuning"}})
    with pytest.raises(ValueError, match=r"model\.peft\.lora_tuning\.row_init_method='ones'"):
        MegatronGPTModel({**tiny_model_cfg(), "peft": _peft(row_init_method="ones")})
    with pytest.raises(ValueError, match=r"model\.peft\.lora_tuning\.target_modules: unknown target 'lm_head'"):
        MegatronGPTModel({**tiny_model_cfg(), "peft": _peft(target_modules=["attention_qkv", "lm_head"])})
    model = _base_model()
    config = copy.copy(model.transformer_config)
    config.sequence_parallel = True
    with pytest.raises(ValueError, match=r"model\.sequence_parallel"):
        lora_block_spec(layer_spec(model.cfg, config), _peft(), config, seed=0)
    plain = MegatronGPTModel({**tiny_model_cfg(), "peft": {"peft_scheme": "none"}})
    assert not lora_adapters(plain) and all(p.requires_grad for p in plain.parameters())
    # A model is built with its adapters, so its base is frozen before any optimizer exists.
    adapted = MegatronGPTModel({**tiny_model_cfg(), "peft": _peft()})
    assert lora_adapters(adapted) and all(".adapter." in name for name, _ in _trainable(adapted).items())
    moe_like = layer_spec(model.cfg, model.transformer_config)
    moe_like.layer_specs = [copy.deepcopy(spec) for spec in moe_like.layer_specs]
    moe_like.layer_specs[1].submodules.mlp.submodules.linear_fc2 = torch.nn.Identity
    with pytest.raises(ValueError, match=r"mlp_fc2 needs megatron-core's RowParallelLinear at layer 2 mlp\.linear_fc2"):
        lora_block_spec(moe_like, _peft(target_modules=["all"]), model.transformer_config, seed=0)


def test_zero_initialised_b_leaves_the_model_unchanged_and_freezes_the_base():
    model = _base_model()
    base = _logits(model)
    model = _with_lora(model, _peft(target_modules=["all"], layer_selection=[2]))
    assert set(lora_adapters(model)) == {f"decoder.layers.1.{path}.adapter" for path in LINEARS}
    assert torch.equal(_logits(model), base)  # B = 0: every adapter adds exact zeros
    assert set(_trainable(model)) == {
        f"model.decoder.layers.1.{path}.adapter.lora_{ab}.weight" for path in LINEARS for ab in "ab"
    }
    shapes = {name: (*a.lora_a.weight.shape, *a.lora_b.weight.shape) for name, a in lora_adapters(model).items()}
    # hidden 64; 4 heads in 2 query groups of kv_channels 16 -> qkv out 128; ffn 128 gated -> fc1 out 256
    assert shapes == {
        "decoder.layers.1.self_attention.linear_qkv.adapter": (4, 64, 128, 4),
        "decoder.layers.1.self_attention.linear_proj.adapter": (4, 64, 64, 4),
        "decoder.layers.1.mlp.linear_fc1.adapter": (4, 64, 256, 4),
        "decoder.layers.1.mlp.linear_fc2.adapter": (4, 128, 64, 4),
    }
    adapter = lora_adapters(model)["decoder.layers.1.mlp.linear_fc1.adapter"]
    assert adapter.scale == 1.0 and not adapter.lora_b.weight.any()  # alpha defaults to adapter_dim


def test_adapters_disabled_compute_the_base_model_bit_exactly():
    model = _base_model()
    base = _logits(model)
    model = _with_lora(model, _peft(target_modules=["all"], row_init_method="normal", alpha=8))
    adapted = _logits(model)
    assert (adapted - base).abs().max() > 1e-2
    with lora_adapters_disabled(model):
        assert torch.equal(_logits(model), base)
    assert torch.equal(_logits(model), adapted)


def _lm_forward_step(chunk, batch):
    output = chunk(
        input_ids=batch,
        position_ids=torch.arange(batch.shape[1])[None].expand_as(batch),
        attention_mask=torch.triu(torch.ones(batch.shape[1], batch.shape[1], dtype=torch.bool), 1)[None, None],
    )

    def loss_func(logits):
        token_logprobs = shifted_logprobs(logits, batch)
        total = -token_logprobs.sum()
        return total, torch.tensor(token_logprobs.numel()), {"sum": total.detach(), "count": token_logprobs.numel()}

    return output, loss_func


def _train(model: MegatronGPTModel, data: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        model.zero_grad_buffers()
        metrics = model.forward_backward([data[:2], data[2:]], 2, _lm_forward_step, False, data.shape[1], 2)
        updated, grad_norm = model.optimizer_step()
        assert updated and grad_norm > 0
        losses.append(sum(m["sum"] for m in metrics).item() / sum(m["count"] for m in metrics))
    return losses


def test_training_moves_only_the_adapters_and_resumes_from_a_trainer_checkpoint(tmp_path):
    peft = _peft(target_modules=["all"], layer_selection=[1, 2])
    data = torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(4))
    model = _with_lora(_base_model(), peft)
    before = model.model_state_dict_in_cpu()
    model.setup_optimization(OPTIM, max_steps=8, gradient_clip_val=1.0)
    losses = _train(model, data, 6)
    assert losses[-1] < losses[0] - 0.1, losses
    after = model.model_state_dict_in_cpu()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if ".adapter." in k} and len(changed) == 16

    # The trainer's checkpoint (model + optimizer sharded state dicts) carries the adapters and their Adam state.
    def sharded(m, is_loading=False):
        model_state = m.sharded_state_dict()
        return {"model": model_state, "optimizer": m.optimizer.sharded_state_dict(model_state, is_loading=is_loading)}

    path = save_checkpoint(tmp_path, "step6", sharded(model), {})
    resumed = _with_lora(_base_model(), peft)
    resumed.setup_optimization(OPTIM, max_steps=8, gradient_clip_val=1.0)
    state, _ = load_checkpoint(path, sharded(resumed, is_loading=True))
    resumed.load_model_state_dict(state["model"])
    resumed.optimizer.load_state_dict(state["optimizer"])
    assert _train(resumed, data, 2) == _train(model, data, 2)
    for key, value in model.model_state_dict_in_cpu().items():
        assert torch.equal(value, resumed.model_state_dict_in_cpu()[key]), key


def test_merge_matches_the_adapted_model_and_save_to_writes_plain_models(tmp_path):
    model = _base_model()
    base = _logits(model)
    model = _with_lora(model, _peft(target_modules=["all"], row_init_method="normal"))
    adapted = _logits(model)
    # Unmerged, save_to writes the base model: a normal .nemo without adapters.
    model.save_to(tmp_path / "base.nemo")
    assert torch.equal(_logits(MegatronGPTModel.restore_from(tmp_path / "base.nemo").eval()), base)

    merge_lora_adapters(model)
    assert not lora_adapters(model)
    assert not any(".adapter." in name for name in model.model_state_dict_in_cpu())
    merged = _logits(model)
    # fp32: (W + s B A) x and W x + s B (A x) differ by rounding only (logits are O(1))
    assert (merged - adapted).abs().max() < 1e-5
    model.save_to(tmp_path / "merged.nemo")
    restored = MegatronGPTModel.restore_from(tmp_path / "merged.nemo").eval()
    assert type(restored.model.decoder.layers[0].self_attention.linear_qkv) is ColumnParallelLinear
    assert torch.equal(_logits(restored), merged)


def test_adapter_checkpoint_round_trip_names_and_mismatches(tmp_path):
    peft = _peft(target_modules=["attention_qkv", "mlp"], layer_selection=[2], row_init_method="normal")
    model = _with_lora(_base_model(), peft)
    _perturb_adapters(model, seed=1)
    expected = _logits(model)
    save_lora_adapters(model, tmp_path / "adapters")
    stored = nemo_file.read_dcp_metadata(tmp_path / "adapters").state_dict_metadata
    prefix = "model.decoder.layers.1."
    assert {key: tuple(meta.size) for key, meta in stored.items()} == {
        f"{prefix}self_attention.linear_qkv.adapter.lora_a.weight": (4, 64),
        f"{prefix}self_attention.linear_qkv.adapter.lora_b.weight": (128, 4),
        f"{prefix}mlp.linear_fc1.adapter.lora_a.weight": (4, 64),
        f"{prefix}mlp.linear_fc1.adapter.lora_b.weight": (256, 4),
        f"{prefix}mlp.linear_fc2.adapter.lora_a.weight": (4, 128),
        f"{prefix}mlp.linear_fc2.adapter.lora_b.weight": (64, 4),
    }
    # The model's full sharded state: the base model's entries plus exactly these adapter tensors.
    full = {v.key for v in model.sharded_state_dict().values()}
    plain = {v.key for v in _base_model().sharded_state_dict().values()}
    assert full == plain | set(stored)

    fresh = _with_lora(_base_model(), peft)
    assert not torch.equal(_logits(fresh), expected)
    load_lora_adapters(fresh, tmp_path / "adapters")
    assert torch.equal(_logits(fresh), expected)
    from_config = _with_lora(_base_model(), peft)
    configure_peft(from_config, OmegaConf.create({"peft": {**peft, "restore_from_path": str(tmp_path / "adapters")}}))
    assert torch.equal(_logits(from_config), expected)

    more_targets = _with_lora(_base_model(), _peft(target_modules=["all"], layer_selection=[2]))
    with pytest.raises(ValueError, match=r"linear_proj\.adapter\.lora_a\.weight: expected by the config, absent"):
        load_lora_adapters(more_targets, tmp_path / "adapters")
    fewer_targets = _with_lora(_base_model(), _peft(target_modules=["attention_qkv"], layer_selection=[2]))
    with pytest.raises(ValueError, match=r"linear_fc2\.adapter\.lora_a\.weight(.|\n)*must match those saved"):
        load_lora_adapters(fewer_targets, tmp_path / "adapters")
    other_alpha = _with_lora(_base_model(), {**peft, "lora_tuning": {**peft["lora_tuning"], "alpha": 8}})
    with pytest.raises(ValueError, match=r"model\.peft\.lora_tuning\.alpha"):
        load_lora_adapters(other_alpha, tmp_path / "adapters")


# ---------------------------------------------------------------------- tensor parallelism (2 gloo ranks)
def _gather_vocab(logits: torch.Tensor) -> torch.Tensor:
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _tp2_shard(name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s slice at TP=2 of a TP=1 adapter tensor, written out by hand."""
    if "linear_qkv.adapter.lora_b" in name:
        return full.chunk(2)[rank]
    if "linear_fc1.adapter.lora_b" in name:  # rows [gate; up] -> [gate shard; up shard]
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(2)[rank], up.chunk(2)[rank]])
    if "linear_proj.adapter.lora_a" in name or "linear_fc2.adapter.lora_a" in name:
        return full.chunk(2, dim=1)[rank]
    return full


def tp2_world(base_path: str, adapters_path: str, save_dir: str, peft: dict, input_ids: list) -> dict:
    """On each of 2 ranks at TP=2: adapters saved at TP=1, logits, gradients, merge; saves adapters and merged."""
    ids = torch.tensor(input_ids)
    model = _lora_from(base_path, peft, tensor_model_parallel_size=2)
    load_lora_adapters(model, adapters_path)
    assert parallel_state.get_tensor_model_parallel_world_size() == 2
    adapters = {name: p.detach().clone() for name, p in _trainable(model).items()}
    logits = _gather_vocab(_logits(model, ids))
    (-model.get_logprobs(ids).sum()).backward()
    grads = {name: p.grad.clone() for name, p in _trainable(model).items()}
    save_lora_adapters(model, f"{save_dir}/tp2_adapters")
    merge_lora_adapters(model)
    merged_logits = _gather_vocab(_logits(model, ids))
    model.save_to(f"{save_dir}/tp2_merged.nemo")
    return {"adapters": adapters, "logits": logits, "grads": grads, "merged_logits": merged_logits}


@pytest.mark.distributed
def test_tp2_adapters_match_tp1_forward_backward_merge_and_checkpoints(tmp_path):
    peft = _peft(target_modules=["all"], row_init_method="normal")
    model = _base_model()
    model.save_to(tmp_path / "base.nemo")
    model = _with_lora(model, peft)
    _perturb_adapters(model, seed=1)
    save_lora_adapters(model, tmp_path / "adapters")
    adapters = {name: p.detach().clone() for name, p in _trainable(model).items()}
    logits = _logits(model)
    (-model.get_logprobs(IDS).sum()).backward()
    grads = {name: p.grad.clone() for name, p in _trainable(model).items()}
    ranks = run_distributed(
        "tests.models.test_lora:tp2_world",
        nprocs=2,
        out_dir=tmp_path / "out",
        base_path=str(tmp_path / "base.nemo"),
        adapters_path=str(tmp_path / "adapters"),
        save_dir=str(tmp_path / "out"),
        peft=peft,
        input_ids=IDS.tolist(),
    )
    merge_lora_adapters(model)
    merged_logits = _logits(model)
    for rank, result in enumerate(ranks):
        assert set(result["adapters"]) == set(adapters) == set(result["grads"])
        for name, full in adapters.items():
            # Loaded from the TP=1 checkpoint: exact slices (fc1's B as [gate shard; up shard]).
            assert torch.equal(result["adapters"][name], _tp2_shard(name, full, rank)), name
            # Backward through the TP mappings: replicated A/B get the full gradient on every rank; TP=2 sums
            # partial products in another order than one process, so fp32 rounding differs (relative 1e-5).
            expected = _tp2_shard(name, grads[name], rank)
            assert (result["grads"][name] - expected).abs().max() <= 1e-5 * expected.abs().max(), name
        assert (result["logits"] - logits).abs().max() < 1e-5
        assert (result["merged_logits"] - merged_logits).abs().max() < 1e-5

    # Saved at TP=2, read at TP=1: the same adapters, and merged weights equal to merging at TP=1.
    back = _lora_from(tmp_path / "base.nemo", peft)
    load_lora_adapters(back, tmp_path / "out" / "tp2_adapters")
    for name, value in _trainable(back).items():
        assert torch.equal(value, adapters[name]), name
    merged_path = tmp_path / "out" / "tp2_merged.nemo"
    tp1_cfg = load_and_override_model_config(merged_path, {"tensor_model_parallel_size": 1})
    merged_tp2 = load_from_nemo(MegatronGPTModel, tp1_cfg, restore_path=merged_path).model_state_dict_in_cpu()
    for key, value in model.model_state_dict_in_cpu().items():
        assert (merged_tp2[key] - value).abs().max() <= 1e-6, key  # B @ A per shard: rounding at most


def test_a_nemo_file_never_brings_adapters(tmp_path):
    """A LoRA run's .nemo holds plain weights; its config's peft section must not add adapters when it is read."""
    model = _with_lora(_base_model(), _peft(target_modules=["all"], row_init_method="normal"))
    model.save_to(tmp_path / "base.nemo")
    with nemo_file.open_nemo(tmp_path / "base.nemo", with_weights=False) as unpacked:
        assert nemo_file.read_model_config(unpacked).peft.peft_scheme == "lora"
    restored = MegatronGPTModel.restore_from(tmp_path / "base.nemo")
    assert not lora_adapters(restored) and all(p.requires_grad for p in restored.parameters())
    assert "peft" not in load_and_override_model_config(tmp_path / "base.nemo", {"seed": 7})
