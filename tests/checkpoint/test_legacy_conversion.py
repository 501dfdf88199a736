"""Legacy (pre-Megatron-Core) NeMo GPT checkpoints -> Megatron-Core ``.nemo``: synthetic files through the CLI.

No real legacy file (e.g. GPT-2B-001) is available here, so each case starts from a tiny perturbed
``MegatronGPTModel``, writes its weights in the legacy layout with this file's own writer (legacy names, per-rank
shards as legacy tensor/pipeline parallelism stores them), runs ``convert_nemo_gpt_to_mcore.py`` and restores the
result. Two independent checks close the loop:

- the written legacy weights give the original model's logits under a plain-torch forward written from NeMo's
  legacy semantics (per-head ``[q, k, v]`` rows, ``torch.chunk`` of ``dense_h_to_4h`` for fast GLUs, a separate
  ``dense_h_to_4h_2`` for the others, ``[3, heads, hn]`` rows with ``megatron_legacy``), so the writer is right;
- the converted checkpoint gives the original weights exactly and the original logits.

Logit tolerance 1e-4: float32 megatron vs a float64 reference (seen: ~1e-6).
"""

from __future__ import annotations

import io
import math
import os
import runpy
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from nemo_aligner.checkpoint import legacy_conversion
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel
from tests.conftest import NEMO_FIXTURES, perturb_, tiny_model_cfg
from tests.models.reference_gpt import _linear, _norm, _rope, reference_logits

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "checkpoint_converters" / "convert_nemo_gpt_to_mcore.py"
LOGIT_ATOL = 1e-4
P = "model.language_model."
SPM_ARTIFACT = "0123456789abcdef0123456789abcdef_tok.model"

MHA = dict(num_query_groups=None)
CASES = {
    # GPT-2B-001's architecture (model card: SwiGLU, RoPE, no biases, untied), with NeMo's layernorm1p and
    # half-width rotary; TP=2 (mp_rank_XX, each rank its own [gate; up] halves) in a .nemo tar with a SentencePiece
    # tokenizer artifact.
    "gpt2b_like": dict(
        cfg=dict(
            MHA,
            activation="fast-swiglu",
            position_embedding_type="rope",
            rotary_percentage=0.5,
            normalization="layernorm1p",
            bias=False,
            share_embeddings_and_output_weights=False,
            tokenizer={"library": "sentencepiece", "model": f"nemo:{SPM_ARTIFACT}"},
        ),
        tp=2,
        pp=1,
        packed=True,
    ),
    # GPT-3-style: GELU, learned positions, LayerNorm, biases, tied embeddings; one model_weights.ckpt, extracted.
    "gelu_learned": dict(
        cfg=dict(
            MHA,
            activation="gelu",
            position_embedding_type="learned_absolute",
            normalization="layernorm",
            bias=True,
            share_embeddings_and_output_weights=True,
        ),
        tp=1,
        pp=1,
        packed=False,
    ),
    # Non-fused SwiGLU (dense_h_to_4h_2) with biases, RMSNorm, megatron_legacy QKV order, O2 key prefix, TP=2 x PP=2.
    "swiglu_split_tp2_pp2": dict(
        cfg=dict(
            MHA,
            activation="swiglu",
            position_embedding_type="rope",
            normalization="rmsnorm",
            bias=True,
            share_embeddings_and_output_weights=False,
            megatron_legacy=True,
        ),
        tp=2,
        pp=2,
        packed=True,
        o2_prefix=True,
    ),
}


# ------------------------------------------------------------------ legacy writer (this test's own)
def legacy_state_dict(mcore: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """A TP=1, PP=1 legacy state dict holding the weights of a ``MegatronGPTModel`` state dict."""
    out = {}
    for key, value in mcore.items():
        name = key.removeprefix("model.")
        name = name.replace("decoder.final_layernorm", "encoder.final_layernorm")
        name = name.replace("decoder.layers.", "encoder.layers.")
        for new, old in (
            ("self_attention.query_key_value", "self_attention.linear_qkv"),
            ("self_attention.dense", "self_attention.linear_proj"),
            ("post_attention_layernorm", "pre_mlp_layernorm"),
            ("mlp.dense_h_to_4h", "mlp.linear_fc1"),
            ("mlp.dense_4h_to_h", "mlp.linear_fc2"),
        ):
            name = name.replace(old, new)
        if ".query_key_value." in name and cfg.get("megatron_legacy"):  # per-head [q, k, v] -> [3, heads, hn]
            rest = value.shape[1:]
            value = value.reshape(cfg["num_attention_heads"], 3, -1, *rest).transpose(0, 1).reshape(value.shape)
        if ".dense_h_to_4h." in name and cfg["activation"] == "swiglu":
            gate, up = value.chunk(2)
            out[P + name], out[P + name.replace("dense_h_to_4h", "dense_h_to_4h_2")] = gate, up
        else:
            out[P + name] = value
    if cfg["position_embedding_type"] == "rope":
        dim = int(cfg["hidden_size"] // cfg["num_attention_heads"] * cfg.get("rotary_percentage", 1.0))
        out[P + "rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    return out


def _rank_shard(key: str, value: torch.Tensor, cfg: dict, tp: int, rank: int) -> torch.Tensor:
    """What tensor-parallel rank ``rank`` of ``tp`` stores of a TP=1 legacy tensor."""
    column = (".query_key_value.", ".dense_h_to_4h", "word_embeddings.", "output_layer.")
    if any(part in key for part in column):
        if ".dense_h_to_4h." in key and cfg["activation"] == "fast-swiglu":
            gate, up = value.chunk(2)  # each rank chunks its own output into its gate and up slices
            return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
        if ".query_key_value." in key and cfg.get("megatron_legacy"):  # [3, heads, hn]: each rank its heads
            return value.reshape(3, tp, -1, *value.shape[1:])[:, rank].reshape(-1, *value.shape[1:])
        return value.chunk(tp)[rank]
    if key.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return value.chunk(tp, dim=1)[rank]
    return value


def legacy_rank_files(legacy: dict[str, torch.Tensor], cfg: dict, tp: int, pp: int) -> dict[str, dict]:
    """{relative file path: state dict} as legacy NeMo saves a TP x PP model (layers numbered per stage)."""
    layers_per_stage = cfg["num_layers"] // pp
    files = {}
    for pp_rank in range(pp):
        stage = {}
        for key, value in legacy.items():
            rest = key[len(P) :]
            if rest.startswith("encoder.layers."):
                index, tail = rest[len("encoder.layers.") :].split(".", 1)
                if int(index) // layers_per_stage != pp_rank:
                    continue
                key = f"{P}encoder.layers.{int(index) % layers_per_stage}.{tail}"
            elif rest.startswith(("embedding.", "rotary_pos_emb.")) and pp_rank != 0:
                continue
            elif rest.startswith(("encoder.final_layernorm", "output_layer")) and pp_rank != pp - 1:
                continue
            stage[key] = value
        if pp > 1 and pp_rank == pp - 1 and cfg["share_embeddings_and_output_weights"]:
            stage["model.word_embeddings.weight"] = legacy[P + "embedding.word_embeddings.weight"]
        for tp_rank in range(tp):
            shard = {k: _rank_shard(k, v, cfg, tp, tp_rank).clone() for k, v in stage.items()}
            if pp > 1:
                name = f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}/model_weights.ckpt"
            else:
                name = f"mp_rank_{tp_rank:02d}/model_weights.ckpt" if tp > 1 else "model_weights.ckpt"
            files[name] = shard
    return files


def write_legacy_nemo(path: Path, cfg: dict, files: dict[str, dict], artifacts: dict[str, bytes], packed: bool):
    """A legacy .nemo: tar (members under ./) or extracted folder with model_config.yaml, artifacts, weights."""
    contents = {"model_config.yaml": yaml.safe_dump(cfg).encode(), **artifacts}
    for name, state_dict in files.items():
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        contents[name] = buffer.getvalue()
    if not packed:
        for name, data in contents.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        return
    with tarfile.open(path, "w:") as tar:
        for name, data in contents.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ------------------------------------------------------------------ legacy forward (NeMo 1.x semantics)
def legacy_reference_logits(sd: dict[str, torch.Tensor], cfg: dict, input_ids: torch.Tensor) -> torch.Tensor:
    """float64 logits of a legacy NeMo GPT from its TP=1 legacy state dict."""
    sd = {k[len("model.") :]: v for k, v in sd.items()}
    lm = "language_model."
    nh, h = cfg["num_attention_heads"], cfg["hidden_size"]
    d = h // nh
    batch, seq = input_ids.shape
    x = sd[lm + "embedding.word_embeddings.weight"].double()[input_ids]
    if cfg["position_embedding_type"] == "learned_absolute":
        x = x + sd[lm + "embedding.position_embeddings.weight"].double()[:seq][None]
    causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    for i in range(cfg["num_layers"]):
        p = f"{lm}encoder.layers.{i}."
        mixed = _linear(_norm(x, sd, p + "input_layernorm", cfg), sd, p + "self_attention.query_key_value")
        if cfg.get("megatron_legacy"):  # [s, b, 3 * np * hn] -> [s, b, np * 3 * hn]
            mixed = mixed.view(batch, seq, 3, nh, d).transpose(2, 3).reshape(batch, seq, -1)
        q, k, v = mixed.view(batch, seq, nh, 3 * d).split(d, dim=-1)
        if cfg["position_embedding_type"] == "rope":
            q, k = (_rope(t, 10000, cfg.get("rotary_percentage", 1.0)) for t in (q, k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, seq, h)
        x = x + _linear(attn, sd, p + "self_attention.dense")
        hidden = _norm(x, sd, p + "post_attention_layernorm", cfg)
        inter = _linear(hidden, sd, p + "mlp.dense_h_to_4h")
        if cfg["activation"] == "fast-swiglu":
            gate, up = torch.chunk(inter, 2, dim=-1)
            inter = F.silu(gate) * up
        elif cfg["activation"] == "swiglu":
            inter = F.silu(inter) * _linear(hidden, sd, p + "mlp.dense_h_to_4h_2")
        else:
            inter = F.gelu(inter)
        x = x + _linear(inter, sd, p + "mlp.dense_4h_to_h")
    x = _norm(x, sd, lm + "encoder.final_layernorm", cfg)
    output = sd.get(lm + "output_layer.weight", sd[lm + "embedding.word_embeddings.weight"])
    return x @ output.double().T


# ------------------------------------------------------------------ fixtures
def _spm_bytes() -> bytes:
    with tarfile.open(NEMO_FIXTURES / "tiny_gpt_ln_gelu_abs.nemo") as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("_tok.model"))
        return tar.extractfile(member).read()


def _input_ids() -> torch.Tensor:
    return torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(3))


def _logits(model: MegatronGPTModel, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids).double()


@pytest.fixture(scope="module")
def convert_main():
    return runpy.run_path(str(SCRIPT))["main"]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, convert_main):
    """(case spec, legacy config, original model, TP=1 legacy weights, legacy .nemo path, converted model)."""
    spec = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    artifacts = {}
    model_cfg = tiny_model_cfg(**spec["cfg"])
    if model_cfg["tokenizer"]["library"] == "sentencepiece":
        artifacts[SPM_ARTIFACT] = _spm_bytes()
        (tmp / SPM_ARTIFACT).write_bytes(artifacts[SPM_ARTIFACT])
        build_cfg = dict(model_cfg, tokenizer={"library": "sentencepiece", "model": str(tmp / SPM_ARTIFACT)})
    else:
        build_cfg = model_cfg
    original = MegatronGPTModel(build_cfg)
    perturb_(original, seed=len(request.param))
    legacy = legacy_state_dict(original.model_state_dict_in_cpu(), model_cfg)

    legacy_cfg = dict(
        model_cfg,
        mcore_gpt=False,
        tensor_model_parallel_size=spec["tp"],
        pipeline_model_parallel_size=spec["pp"],
    )
    files = legacy_rank_files(legacy, legacy_cfg, spec["tp"], spec["pp"])
    if spec.get("o2_prefix"):
        files = {n: {k.replace("model.", "model.module.", 1): v for k, v in sd.items()} for n, sd in files.items()}
    source = tmp / ("legacy.nemo" if spec["packed"] else "legacy_dir")
    if not spec["packed"]:
        source.mkdir()
    write_legacy_nemo(source, legacy_cfg, files, artifacts, spec["packed"])

    out = tmp / "out" / "mcore.nemo"
    flag = "--in-file" if spec["packed"] else "--in-folder"
    convert_main([flag, str(source), "--out-file", str(out), "--cpu-only"])
    converted = MegatronGPTModel.restore_from(out)
    return spec, legacy_cfg, original, legacy, source, converted


# ------------------------------------------------------------------ tests
@pytest.mark.slow
def test_written_legacy_weights_follow_legacy_semantics(case):
    _, legacy_cfg, original, legacy, _, _ = case
    input_ids = _input_ids()
    expected = _logits(original, input_ids)
    actual = legacy_reference_logits(legacy, legacy_cfg, input_ids)
    assert (actual - expected).abs().max().item() < LOGIT_ATOL


@pytest.mark.slow
def test_converted_checkpoint_has_the_original_weights_and_logits(case):
    _, _, original, _, _, converted = case
    want, got = original.model_state_dict_in_cpu(), converted.model_state_dict_in_cpu()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key], tensor), key
    input_ids = _input_ids()
    expected = _logits(original, input_ids)
    assert (_logits(converted, input_ids) - expected).abs().max().item() < LOGIT_ATOL
    # and against the independent Megatron-Core-semantics reference, from the converted weights and config
    reference = reference_logits(got, dict(converted.cfg), input_ids)
    assert (reference - expected).abs().max().item() < LOGIT_ATOL


@pytest.mark.slow
def test_converted_config(case):
    spec, legacy_cfg, _, _, _, converted = case
    cfg = converted.cfg
    assert cfg.mcore_gpt is True
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (1, 1)
    assert "megatron_legacy" not in cfg
    for key in ("num_layers", "hidden_size", "activation", "normalization", "position_embedding_type", "bias"):
        assert cfg[key] == legacy_cfg[key], key
    if legacy_cfg["tokenizer"]["library"] == "sentencepiece":
        assert Path(cfg.tokenizer.model).read_bytes() == _spm_bytes()  # the artifact travelled


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gelu_learned"], indirect=True)
def test_existing_output_is_kept_unless_overwrite(case, convert_main, tmp_path):
    source = case[4]
    out = tmp_path / "out.nemo"
    out.write_bytes(b"keep")
    convert_main(["--in-folder", str(source), "--out-file", str(out)])
    assert out.read_bytes() == b"keep"
    convert_main(["--in-folder", str(source), "--out-file", str(out), "--overwrite"])
    assert MegatronGPTModel.restore_from(out).cfg.mcore_gpt is True


# ------------------------------------------------------------------ refusals
def _gpt2b_cfg(**overrides) -> dict:
    return dict(tiny_model_cfg(**CASES["gpt2b_like"]["cfg"]), mcore_gpt=False, **overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_query_groups=2), "no GQA"),
        (dict(activation="reglu"), "activation='reglu'"),
        (dict(position_embedding_type="alibi"), "position_embedding_type='alibi'"),
        (dict(transformer_block_type="post_ln"), "transformer_block_type='post_ln'"),
    ],
)
def test_unsupported_legacy_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        legacy_conversion.mcore_config_from_legacy(_gpt2b_cfg(**overrides))


def test_wrong_rope_base_and_unknown_tensors_are_refused():
    cfg = _gpt2b_cfg()
    inv_freq = {P + "rotary_pos_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)}
    legacy_conversion.mcore_state_dict_from_legacy(inv_freq, cfg)  # base 10000, 16 * 0.5 rotary dims: fine
    with pytest.raises(ValueError, match="rotary_base=500000"):
        legacy_conversion.mcore_state_dict_from_legacy(inv_freq, dict(cfg, rotary_base=500000))
    with pytest.raises(ValueError, match="layernorm_qkv"):
        legacy_conversion.mcore_state_dict_from_legacy({P + "encoder.layers.0.layernorm_qkv.weight": None}, cfg)


def test_torch_dist_input_is_refused(convert_main, tmp_path):
    source = NEMO_FIXTURES / "tiny_gpt_ln_gelu_abs.nemo"
    with pytest.raises(SystemExit, match="already a Megatron-Core"):
        convert_main(["--in-file", str(source), "--out-file", str(tmp_path / "x.nemo")])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gpt2b_like"], indirect=True)
def test_the_documented_commands_convert_a_gpt2b_like_file(case, tmp_path):
    """docs/checkpoints.md's legacy block, run verbatim on the synthetic GPT-2B-like file under GPT-2B-001's name."""
    docs = (REPO / "docs" / "checkpoints.md").read_text()
    section = docs[docs.index("## Legacy (pre-Megatron-Core)") :]
    start = section.index("```console\n") + len("```console\n")
    commands = section[start : section.index("\n```", start)]
    shutil.copyfile(case[4], tmp_path / "GPT-2B-001_bf16_tp1.nemo")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        ["bash", "-euo", "pipefail", "-c", commands.replace("scripts/", f"{REPO}/scripts/")],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        timeout=600,
    )
    converted = MegatronGPTModel.restore_from(tmp_path / "mcore_gpt.nemo")
    input_ids = _input_ids()
    assert (_logits(converted, input_ids) - _logits(case[2], input_ids)).abs().max().item() < LOGIT_ATOL
