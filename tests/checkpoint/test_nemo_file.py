"""Tests of the `.nemo` container layer against files written by NVIDIA NeMo 2.5.0, and against crafted bad files."""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nemo_aligner.checkpoint.nemo_file import (
    NemoFormatError,
    detect_weights_layout,
    legacy_weights_path,
    load_legacy_state_dict,
    open_nemo,
    read_dcp_metadata,
    read_model_config,
    read_torch_dist_tensors,
    resolve_artifact_paths,
    save_nemo,
    strip_o2_prefix,
    verify_torch_dist,
)

_REPO_FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nemo"
FIXTURES = _REPO_FIXTURES if _REPO_FIXTURES.is_dir() else Path("/work/shared/fixtures/nemo")
NAMES = ["tiny_gpt_ln_gelu_abs", "tiny_gpt_rms_swiglu_rope_gqa", "tiny_gpt_ln_swiglu_rope50"]
TOKENIZER_ARTIFACT = "74edd76eb742473d9fc51b521710dc95_tok.model"

# On-disk shapes documented in the fixtures' README: L=2 layers, h=64, 4 heads, (nh + 2*ng)*d rows of QKV.
L, H = 2, 64
EXPECTED_SHAPES = {
    "tiny_gpt_ln_gelu_abs": {
        "model.embedding.word_embeddings.weight": [256, H],
        "model.embedding.position_embeddings.weight": [64, H],
        "model.decoder.layers.self_attention.linear_qkv.weight": [L, 192, H],
        "model.decoder.layers.self_attention.linear_qkv.bias": [L, 192],
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": [L, H],
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_bias": [L, H],
        "model.decoder.layers.self_attention.linear_proj.weight": [L, H, H],
        "model.decoder.layers.self_attention.linear_proj.bias": [L, H],
        "model.decoder.layers.mlp.linear_fc1.weight": [L, 256, H],
        "model.decoder.layers.mlp.linear_fc1.bias": [L, 256],
        "model.decoder.layers.mlp.linear_fc1.layer_norm_weight": [L, H],
        "model.decoder.layers.mlp.linear_fc1.layer_norm_bias": [L, H],
        "model.decoder.layers.mlp.linear_fc2.weight": [L, H, 256],
        "model.decoder.layers.mlp.linear_fc2.bias": [L, H],
        "model.decoder.final_layernorm.weight": [H],
        "model.decoder.final_layernorm.bias": [H],
    },
    "tiny_gpt_rms_swiglu_rope_gqa": {
        "model.embedding.word_embeddings.weight": [512, H],
        "model.decoder.layers.self_attention.linear_qkv.weight": [L, 128, H],  # (4 + 2*2) * 16
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": [L, H],
        "model.decoder.layers.self_attention.linear_proj.weight": [L, H, H],
        "model.decoder.layers.mlp.linear_fc1.weight": [L, 256, H],  # swiglu: 2 * ffn 128
        "model.decoder.layers.mlp.linear_fc1.layer_norm_weight": [L, H],
        "model.decoder.layers.mlp.linear_fc2.weight": [L, H, 128],
        "model.decoder.final_layernorm.weight": [H],
        "model.output_layer.weight": [512, H],
    },
    "tiny_gpt_ln_swiglu_rope50": {
        "model.embedding.word_embeddings.weight": [512, H],
        "model.decoder.layers.self_attention.linear_qkv.weight": [L, 192, H],
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_weight": [L, H],
        "model.decoder.layers.self_attention.linear_qkv.layer_norm_bias": [L, H],
        "model.decoder.layers.self_attention.linear_proj.weight": [L, H, H],
        "model.decoder.layers.mlp.linear_fc1.weight": [L, 256, H],
        "model.decoder.layers.mlp.linear_fc1.layer_norm_weight": [L, H],
        "model.decoder.layers.mlp.linear_fc1.layer_norm_bias": [L, H],
        "model.decoder.layers.mlp.linear_fc2.weight": [L, H, 128],
        "model.decoder.final_layernorm.weight": [H],
        "model.decoder.final_layernorm.bias": [H],
        "model.output_layer.weight": [512, H],
    },
}


def fixture(name: str) -> Path:
    return FIXTURES / f"{name}.nemo"


def unpack_trusted(archive: Path, dest: Path) -> Path:
    """Reference extraction of a trusted fixture with plain tarfile."""
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def dir_contents(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_tensors(tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors of each trusted fixture read by torch's own DCP -> torch.save converter (an independent reader)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = {}
    for name in NAMES:
        tmp = tmp_path_factory.mktemp(name)
        unpack_trusted(fixture(name), tmp)
        dcp_to_torch_save(tmp / "model_weights", tmp / "ref.pt")
        loaded = torch.load(tmp / "ref.pt", weights_only=False)  # trusted fixture
        out[name] = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return out


def make_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def link_member(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def open_and_close(path: Path, **kwargs) -> None:
    with open_nemo(path, **kwargs):
        pass


class RunsCommand:
    """Pickles into a call of os.system: what a malicious checkpoint would contain."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --------------------------------------------------------------------------------------------------------------
# Reading NeMo-written files
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_open_tar_reads_config_and_cleans_up(name):
    with open_nemo(fixture(name)) as unpacked:
        cfg = read_model_config(unpacked)
        assert (unpacked / "model_config.yaml").read_bytes() == (FIXTURES / f"{name}.model_config.yaml").read_bytes()
        assert (unpacked / "model_weights" / "metadata.json").is_file()
    assert not unpacked.exists()
    assert cfg.hidden_size == 64
    assert cfg.num_layers == 2
    assert cfg.num_attention_heads == 4
    assert cfg.nemo_version == "2.5.0"
    assert cfg.target == "nemo.collections.nlp.models.language_modeling.megatron_gpt_model.MegatronGPTModel"


def test_open_unpacked_directory_yields_it(tmp_path):
    unpacked = unpack_trusted(fixture(NAMES[1]), tmp_path / "unpacked")
    with open_nemo(unpacked) as opened:
        assert opened == unpacked
        assert read_model_config(opened).ffn_hidden_size == 128
        assert detect_weights_layout(opened) == "torch_dist"
    assert unpacked.is_dir()


def test_gzip_tar_is_accepted(tmp_path, reference_tensors):
    gz = tmp_path / "model.nemo"
    gz.write_bytes(gzip.compress(fixture(NAMES[2]).read_bytes()))
    with open_nemo(gz) as unpacked:
        assert read_model_config(unpacked).rotary_percentage == 0.5
        tensors = read_torch_dist_tensors(unpacked / "model_weights")
    for key, ref in reference_tensors[NAMES[2]].items():
        assert torch.equal(tensors[key], ref), key


def test_resolve_artifact_paths_fixture1():
    with open_nemo(fixture(NAMES[0])) as unpacked:
        cfg = read_model_config(unpacked)
        resolved = resolve_artifact_paths(cfg, unpacked)
        model_path = Path(resolved.tokenizer.model)
        assert model_path.is_absolute()
        assert model_path.is_file()
        assert model_path == (unpacked / TOKENIZER_ARTIFACT).resolve()
        with tarfile.open(fixture(NAMES[0])) as tar:
            assert model_path.read_bytes() == tar.extractfile(f"./{TOKENIZER_ARTIFACT}").read()
    assert cfg.tokenizer.model == f"nemo:{TOKENIZER_ARTIFACT}"  # the input is not modified
    assert resolved.tokenizer.library == "sentencepiece"
    assert resolved.target == cfg.target


def test_resolve_artifact_paths_nested_and_errors(tmp_path):
    (tmp_path / "abc_vocab.json").write_text("{}")
    cfg = OmegaConf.create({"a": {"files": ["keep", "nemo:abc_vocab.json"]}, "n": 3, "ref": "${n}"})
    resolved = resolve_artifact_paths(cfg, tmp_path)
    assert resolved.a.files == ["keep", str((tmp_path / "abc_vocab.json").resolve())]
    assert resolved.ref == 3
    with pytest.raises(NemoFormatError, match=r"'tokenizer\.merge_file'.*nemo:missing_merges\.txt"):
        resolve_artifact_paths(OmegaConf.create({"tokenizer": {"merge_file": "nemo:missing_merges.txt"}}), tmp_path)
    with pytest.raises(NemoFormatError, match=r"'tokenizer\.model'.*not a plain file name"):
        resolve_artifact_paths(OmegaConf.create({"tokenizer": {"model": "nemo:../abc_vocab.json"}}), tmp_path)


@pytest.mark.parametrize("name", NAMES)
def test_read_torch_dist_tensors(name, reference_tensors):
    with open_nemo(fixture(name)) as unpacked:
        tensors = read_torch_dist_tensors(unpacked / "model_weights")
    assert {k: list(v.shape) for k, v in tensors.items()} == EXPECTED_SHAPES[name]
    assert all(v.dtype == torch.float32 for v in tensors.values())
    assert tensors.keys() == reference_tensors[name].keys()
    for key, ref in reference_tensors[name].items():
        assert torch.equal(tensors[key], ref), key


def test_fixture_metadata_passes_safety_checks():
    with open_nemo(fixture(NAMES[0])) as unpacked:
        metadata = read_dcp_metadata(unpacked / "model_weights")
        verify_torch_dist(unpacked / "model_weights")
    extra = [k for k in metadata.state_dict_metadata if "._extra_state/shard_" in k]
    assert len(extra) == 8


# --------------------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------------------


def copy_weights_from(source: Path):
    def write_weights(weights_dir: Path) -> None:
        assert weights_dir.name == "model_weights"
        assert not any(weights_dir.iterdir())
        shutil.copytree(source, weights_dir, dirs_exist_ok=True)

    return write_weights


@pytest.mark.parametrize("packed", [True, False])
def test_save_round_trip(tmp_path, packed, reference_tensors):
    original = unpack_trusted(fixture(NAMES[0]), tmp_path / "original")
    cfg = read_model_config(original)
    cfg.tokenizer.model = "/somewhere/else/tok.model"  # what a model holds after resolve_artifact_paths
    out = tmp_path / ("out.nemo" if packed else "out_dir")

    written = save_nemo(
        out,
        cfg,
        copy_weights_from(original / "model_weights"),
        artifacts={"tokenizer.model": original / TOKENIZER_ARTIFACT},
        packed=packed,
    )

    assert out.is_file() == packed
    if packed:
        with tarfile.open(out, "r:") as tar:  # uncompressed
            assert tar.format == tarfile.PAX_FORMAT
            assert all(m.name == "." or m.name.startswith("./") for m in tar.getmembers())
    new_name = written.tokenizer.model.removeprefix("nemo:")
    assert len(new_name.split("_", 1)[0]) == 32
    assert new_name.endswith("_" + TOKENIZER_ARTIFACT.split("_", 1)[1])
    with open_nemo(out) as unpacked:
        reread = read_model_config(unpacked)
        assert OmegaConf.to_container(reread) == OmegaConf.to_container(written)
        expected_cfg = OmegaConf.to_container(read_model_config(original))
        expected_cfg["tokenizer"]["model"] = written.tokenizer.model
        assert OmegaConf.to_container(reread) == expected_cfg
        assert (unpacked / new_name).read_bytes() == (original / TOKENIZER_ARTIFACT).read_bytes()
        assert dir_contents(unpacked / "model_weights") == dir_contents(original / "model_weights")
        assert set(dir_contents(unpacked)) == {new_name, "model_config.yaml"} | {
            f"model_weights/{f}" for f in dir_contents(original / "model_weights")
        }
        tensors = read_torch_dist_tensors(unpacked / "model_weights")
    for key, ref in reference_tensors[NAMES[0]].items():
        assert torch.equal(tensors[key], ref), key
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["original", out.name])


def test_save_resolves_interpolations_and_replaces_existing(tmp_path):
    out = tmp_path / "m.nemo"
    out.write_bytes(b"old")
    cfg = OmegaConf.create({"hidden_size": 8, "ffn_hidden_size": "${hidden_size}", "target": "x.Y"})
    save_nemo(out, cfg, lambda d: (d / "metadata.json").write_text("{}"))
    with open_nemo(out) as unpacked:
        text = (unpacked / "model_config.yaml").read_text()
        assert read_model_config(unpacked) == OmegaConf.create(
            {"hidden_size": 8, "ffn_hidden_size": 8, "target": "x.Y"}
        )
    assert "${" not in text
    assert os.listdir(tmp_path) == ["m.nemo"]


@pytest.mark.parametrize("packed", [True, False])
def test_save_failure_leaves_nothing(tmp_path, packed):
    out = tmp_path / "m.nemo"

    def failing_writer(weights_dir: Path) -> None:
        (weights_dir / "__0_0.distcp").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_nemo(out, {"a": 1}, failing_writer, packed=packed)
    assert os.listdir(tmp_path) == []

    existing = tmp_path / "existing.nemo"
    existing.write_bytes(b"previous checkpoint")
    with pytest.raises(RuntimeError, match="disk full"):
        save_nemo(existing, {"a": 1}, failing_writer)
    assert existing.read_bytes() == b"previous checkpoint"
    assert os.listdir(tmp_path) == ["existing.nemo"]


def test_save_refuses_bad_input(tmp_path):
    with pytest.raises(NemoFormatError, match=r"'tokenizer\.model'.*nemo:gone\.model"):
        save_nemo(tmp_path / "a.nemo", {"tokenizer": {"model": "nemo:gone.model"}}, lambda d: None)
    with pytest.raises(FileNotFoundError, match=r"'tokenizer\.model'.*missing\.model"):
        save_nemo(tmp_path / "a.nemo", {}, lambda d: None, artifacts={"tokenizer.model": tmp_path / "missing.model"})
    with pytest.raises(ValueError, match="wrote nothing"):
        save_nemo(tmp_path / "a.nemo", {}, lambda d: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_nemo(tmp_path / "no_dir" / "a.nemo", {}, lambda d: None)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------------------
# Bad or malicious containers
# --------------------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.nemo"):
        open_and_close(tmp_path / "nope.nemo")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_tar(tmp_path, compress):
    data = fixture(NAMES[0]).read_bytes()
    bad = tmp_path / "half.nemo"
    bad.write_bytes(gzip.compress(data)[: len(gzip.compress(data)) // 2] if compress else data[: len(data) // 2])
    with pytest.raises(NemoFormatError, match=r"half\.nemo.*truncated or not a \.nemo tar"):
        open_and_close(bad)


def test_tar_cut_at_member_boundary(tmp_path):
    """tarfile lists no further members at a clean cut; the missing end-of-archive marker must still be caught."""
    with tarfile.open(fixture(NAMES[0])) as tar:
        cut = tar.getmember("./model_weights/.metadata").offset
    bad = tmp_path / "cut.nemo"
    bad.write_bytes(fixture(NAMES[0]).read_bytes()[:cut])
    with pytest.raises(NemoFormatError, match=r"cut\.nemo.*truncated"):
        open_and_close(bad)


def test_not_a_tar(tmp_path):
    bad = tmp_path / "noise.nemo"
    bad.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(NemoFormatError, match=r"noise\.nemo.*not a \.nemo tar"):
        open_and_close(bad)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (file_member("./../evil"), r"'\./\.\./evil'.*escapes"),
        (file_member("model_weights/../../evil"), r"'model_weights/\.\./\.\./evil'.*escapes"),
        (file_member("/tmp/evil_abs"), r"'/tmp/evil_abs'.*escapes"),
        (link_member("./up", "../..", tarfile.SYMTYPE), r"'\./up'.*link to '\.\./\.\.' escapes"),
        (link_member("./etc", "/etc", tarfile.SYMTYPE), r"'\./etc'.*link to '/etc' escapes"),
        (link_member("./hard", "../outside", tarfile.LNKTYPE), r"'\./hard'.*link to '\.\./outside' escapes"),
    ],
)
def test_unsafe_members_are_refused(tmp_path, member, message):
    archive = make_tar(tmp_path / "evil.nemo", [file_member("./model_config.yaml", b"a: 1\n"), member])
    extract_root = tmp_path / "deep" / "extract"
    extract_root.mkdir(parents=True)
    with pytest.raises(NemoFormatError, match=rf"evil\.nemo.*{message}"):
        open_and_close(archive, tmp_dir=extract_root)
    assert os.listdir(extract_root) == []  # the temporary directory is gone, nothing landed next to it
    assert sorted(os.listdir(tmp_path)) == ["deep", "evil.nemo"]
    assert os.listdir(tmp_path / "deep") == ["extract"]
    assert not Path("/tmp/evil_abs").exists()


def test_device_file_is_refused(tmp_path):
    dev = tarfile.TarInfo("./model_weights/null")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    archive = make_tar(tmp_path / "dev.nemo", [file_member("./model_config.yaml", b"a: 1\n"), (dev, None)])
    with pytest.raises(NemoFormatError, match=r"'\./model_weights/null'.*not a regular file"):
        open_and_close(archive)


def test_symlink_inside_is_allowed(tmp_path):
    archive = make_tar(
        tmp_path / "ok.nemo",
        [file_member("./real.yaml", b"a: 1\n"), link_member("./model_config.yaml", "real.yaml", tarfile.SYMTYPE)],
    )
    with open_nemo(archive) as unpacked:
        assert read_model_config(unpacked).a == 1


def test_no_model_config(tmp_path):
    archive = make_tar(tmp_path / "empty.nemo", [file_member("./model_weights/metadata.json", b"{}")])
    with pytest.raises(NemoFormatError, match=r"empty\.nemo.*no model_config\.yaml"):
        open_and_close(archive)
    (tmp_path / "dir").mkdir()
    with pytest.raises(NemoFormatError, match=r"dir.*no model_config\.yaml"):
        open_and_close(tmp_path / "dir")


# --------------------------------------------------------------------------------------------------------------
# Weights layouts
# --------------------------------------------------------------------------------------------------------------


def write_metadata_json(root: Path, backend: str) -> None:
    (root / "model_weights").mkdir(parents=True)
    meta = {"sharded_backend": backend, "sharded_backend_version": 1}
    (root / "model_weights" / "metadata.json").write_text(json.dumps(meta))


def test_zarr_and_unknown_layouts(tmp_path):
    write_metadata_json(tmp_path / "zarr", "zarr")
    with pytest.raises(NemoFormatError, match=r"zarr.*not supported; convert"):
        detect_weights_layout(tmp_path / "zarr")
    write_metadata_json(tmp_path / "other", "hdf5")
    with pytest.raises(NemoFormatError, match=r"model_weights.*unsupported sharded_backend 'hdf5'"):
        detect_weights_layout(tmp_path / "other")
    (tmp_path / "nometa" / "model_weights").mkdir(parents=True)
    with pytest.raises(NemoFormatError, match=r"metadata\.json not found"):
        detect_weights_layout(tmp_path / "nometa")
    (tmp_path / "none").mkdir()
    with pytest.raises(NemoFormatError, match=r"none: no model weights found"):
        detect_weights_layout(tmp_path / "none")


def test_legacy_layout_and_o2_prefix(tmp_path):
    weights = {"model.module.decoder.final_layernorm.weight": torch.arange(4.0), "model.module.x.bias": torch.ones(2)}
    saved = {**weights, "model.module.decoder.layers.0.self_attention.linear_qkv._extra_state": io.BytesIO(b"te")}
    torch.save(saved, tmp_path / "model_weights.ckpt")
    (tmp_path / "model_config.yaml").write_text("megatron_amp_O2: true\n")

    assert detect_weights_layout(tmp_path) == "legacy"
    loaded = load_legacy_state_dict(tmp_path)
    assert loaded.keys() == weights.keys()
    stripped = strip_o2_prefix(loaded)
    assert list(stripped) == ["model.decoder.final_layernorm.weight", "model.x.bias"]
    assert torch.equal(stripped["model.decoder.final_layernorm.weight"], torch.arange(4.0))
    assert strip_o2_prefix({"model.a": torch.ones(1)}).keys() == {"model.a"}
    with pytest.raises(ValueError, match="both"):
        strip_o2_prefix({"model.module.a": torch.ones(1), "model.a": torch.ones(1)})


def test_legacy_model_parallel_file_names(tmp_path):
    assert legacy_weights_path(tmp_path) == tmp_path / "model_weights.ckpt"
    assert legacy_weights_path(tmp_path, tp_rank=1, tp_size=2) == tmp_path / "mp_rank_01" / "model_weights.ckpt"
    assert (
        legacy_weights_path(tmp_path, tp_rank=1, pp_rank=2, tp_size=2, pp_size=4)
        == tmp_path / "tp_rank_01_pp_rank_002" / "model_weights.ckpt"
    )
    with pytest.raises(ValueError, match="outside the grid"):
        legacy_weights_path(tmp_path, tp_rank=2, tp_size=2)

    for tp in range(2):
        (tmp_path / f"mp_rank_{tp:02d}").mkdir()
        torch.save({"model.w": torch.full((2,), float(tp))}, tmp_path / f"mp_rank_{tp:02d}" / "model_weights.ckpt")
    assert detect_weights_layout(tmp_path) == "legacy"
    assert torch.equal(load_legacy_state_dict(tmp_path, tp_rank=1, tp_size=2)["model.w"], torch.ones(2))
    with pytest.raises(NemoFormatError, match=r"model_weights\.ckpt not found for tp_size=1.*mp_rank_00"):
        load_legacy_state_dict(tmp_path)


def test_legacy_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model.w": torch.ones(1), "evil": RunsCommand(marker)}, tmp_path / "model_weights.ckpt")
    with pytest.raises(NemoFormatError, match=r"model_weights\.ckpt: refusing"):
        load_legacy_state_dict(tmp_path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------------
# torch DCP pickles
# --------------------------------------------------------------------------------------------------------------


def test_malicious_dcp_metadata_is_refused(tmp_path):
    unpacked = unpack_trusted(fixture(NAMES[1]), tmp_path / "unpacked")
    marker = tmp_path / "pwned"
    (unpacked / "model_weights" / ".metadata").write_bytes(pickle.dumps(RunsCommand(marker)))
    weights_dir = unpacked / "model_weights"
    for read in (read_dcp_metadata, read_torch_dist_tensors, verify_torch_dist):
        with pytest.raises(NemoFormatError, match=r"\.metadata: refusing to unpickle (posix|os)\.system"):
            read(weights_dir)
    with pytest.raises(NemoFormatError, match="refusing to unpickle"):
        detect_weights_layout(unpacked)
    assert not marker.exists()


def test_corrupt_dcp_metadata(tmp_path):
    unpacked = unpack_trusted(fixture(NAMES[1]), tmp_path / "unpacked")
    metadata_file = unpacked / "model_weights" / ".metadata"
    metadata_file.write_bytes(metadata_file.read_bytes()[:100])
    with pytest.raises(NemoFormatError, match=r"\.metadata: corrupt torch DCP metadata"):
        read_dcp_metadata(unpacked / "model_weights")


def test_dcp_storage_path_outside_directory_is_refused(tmp_path):
    unpacked = unpack_trusted(fixture(NAMES[1]), tmp_path / "unpacked")
    metadata_file = unpacked / "model_weights" / ".metadata"
    metadata = pickle.loads(metadata_file.read_bytes())  # trusted fixture
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(metadata.storage_data[index], relative_path="../secret")
    metadata_file.write_bytes(pickle.dumps(metadata))
    with pytest.raises(NemoFormatError, match=r"points outside the directory: '\.\./secret'"):
        read_torch_dist_tensors(unpacked / "model_weights")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_malicious_byte_entry_is_never_unpickled(tmp_path):
    """DCP's own planner would unpickle this entry with weights_only=False; ours must refuse or skip it."""
    import torch.distributed.checkpoint as dcp

    marker = tmp_path / "pwned"
    weights_dir = tmp_path / "model_weights"
    weights = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.arange(3).bfloat16()}
    dcp.save({**weights, "evil": RunsCommand(marker)}, checkpoint_id=weights_dir, no_dist=True)

    tensors = read_torch_dist_tensors(weights_dir)
    assert tensors.keys() == weights.keys()
    for key, value in weights.items():
        assert tensors[key].dtype == value.dtype
        assert torch.equal(tensors[key], value)
    with pytest.raises(NemoFormatError, match=r"model_weights: refusing entry 'evil'"):
        verify_torch_dist(weights_dir)
    assert not marker.exists()
