"""Read and write the NeMo `.nemo` container: a tar holding `model_config.yaml`, artifacts and model weights.

This module deals with files only, never with models. The model code builds its megatron-core sharded state dict
and calls `dist_checkpointing.save/load` on the `model_weights/` directory this module unpacks or packs.

Layout::

    ./model_config.yaml              OmegaConf dump of the model config (with `target`, `nemo_version`)
    ./<32-hex uuid>_<basename>       artifacts, referenced from the config as `nemo:<32-hex uuid>_<basename>`
    ./model_weights/                 megatron-core distributed checkpoint (torch_dist backend), or legacy
    ./model_weights.ckpt             plain torch state dict (TP=PP=1), or mp_rank_XX/ / tp_rank_XX_pp_rank_YYY/

Safety: a `.nemo` file is untrusted input. Extraction refuses members that would land outside the target
directory, and nothing in it is unpickled without a restriction: torch DCP's `.metadata` pickle goes through an
allowlist unpickler, everything else through `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import types
import uuid
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import torch
from omegaconf import DictConfig, OmegaConf

MODEL_CONFIG_FILE = "model_config.yaml"
MODEL_WEIGHTS_DIR = "model_weights"
LEGACY_WEIGHTS_FILE = "model_weights.ckpt"
ARTIFACT_PREFIX = "nemo:"
_EXTRA_STATE = "_extra_state"
_O2_PREFIX = "model.module."

WeightsLayout = Literal["torch_dist", "legacy"]


class NemoFormatError(ValueError):
    """A `.nemo` file (or unpacked directory) is malformed, unsafe or of an unsupported kind."""


# ---------------------------------------------------------------------------------------------------------------
# Container: open (unpack) and save (pack)
# ---------------------------------------------------------------------------------------------------------------

_scratch_dirs: set[str] = set()


def scratch_dir(prefix: str) -> str:
    """A new temporary directory that is removed when the process exits (or earlier, by its owner)."""
    path = tempfile.mkdtemp(prefix=prefix)
    _scratch_dirs.add(path)
    return path


@atexit.register
def _remove_scratch_dirs() -> None:
    for path in list(_scratch_dirs):
        shutil.rmtree(path, ignore_errors=True)
    _scratch_dirs.clear()


@contextlib.contextmanager
def open_nemo(
    path: str | os.PathLike, tmp_dir: str | os.PathLike | None = None, *, with_weights: bool = True
) -> Iterator[Path]:
    """Yield an unpacked directory for a `.nemo` tar (plain or gzip) or for an already unpacked directory.

    A tar is extracted into a fresh temporary directory (under `tmp_dir` if given), removed on exit; a directory is
    yielded as is. With `with_weights=False` a tar gives only `model_config.yaml` and the artifacts, which is cheap
    even for a large model (reading the config, building the tokenizer). Raises FileNotFoundError if `path` is
    missing, NemoFormatError if the tar is truncated, corrupt, holds an unsafe member, or has no `model_config.yaml`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f".nemo checkpoint not found: {path}")
    if path.is_dir():
        _require_model_config(path, path)
        _refuse_outside_paths(path, path)
        with _naming(path):
            yield path
        return
    with tempfile.TemporaryDirectory(prefix="nemo_", dir=tmp_dir) as tmp:
        unpacked = Path(tmp)
        select = None if with_weights else _outside_weights
        _safe_extract(path, unpacked, select=select)
        _require_model_config(unpacked, path)
        _refuse_outside_paths(unpacked, path)
        with _naming(path):
            yield unpacked


@contextlib.contextmanager
def _naming(source: Path) -> Iterator[None]:
    """A NemoFormatError raised while the checkpoint is open names it (its unpacked copy is a temporary path)."""
    try:
        yield
    except NemoFormatError as err:
        if str(source) in str(err):
            raise
        raise NemoFormatError(f"{source}: {err}") from err


# Tokenizer keys that name files (tokenizers.build_tokenizer opens them).
_TOKENIZER_FILE_KEYS = ("model", "vocab_file", "merge_file", "tokenizer_model", "type")


def _refuse_outside_paths(unpacked_dir: Path, source: Path) -> None:
    """An untrusted `.nemo` may point its tokenizer only at its own artifacts (`nemo:<name>`) or at plain names:
    an absolute path, `~` or `..` would make us open a file of this machine, so it is refused before anything is
    opened."""
    try:
        tokenizer = OmegaConf.load(unpacked_dir / MODEL_CONFIG_FILE).get("tokenizer")
    except Exception:  # a malformed config is reported, with its reason, by read_model_config
        return
    if not isinstance(tokenizer, DictConfig):
        return
    carried = any(str(tokenizer.get(key)).startswith(ARTIFACT_PREFIX) for key in ("model", "vocab_file"))
    for key in _TOKENIZER_FILE_KEYS:
        value = tokenizer.get(key)
        if not isinstance(value, str) or (key == "type" and carried):
            # Our files name the HF tokenizer directory in `type` for NeMo; reading them never opens it
            # (tokenizers._hf_source takes the carried artifact first).
            continue
        name = value[len(ARTIFACT_PREFIX) :] if value.startswith(ARTIFACT_PREFIX) else value
        parts = PurePosixPath(name.replace("\\", "/"))
        if parts.is_absolute() or name.startswith("~") or ".." in parts.parts or (name != value and "/" in name):
            raise NemoFormatError(
                f"{source}: refusing tokenizer.{key}={value!r}: a path outside the checkpoint (absolute, ~ or ..) "
                "in an untrusted .nemo would open a file of this machine; store the file inside the .nemo "
                f"({ARTIFACT_PREFIX}<name>)"
            )


def _outside_weights(name: str) -> bool:
    """Root-level members (config, artifacts), not the weights: what reading a config or tokenizer needs."""
    return len(PurePosixPath(name).parts) <= 2 and f"/{MODEL_WEIGHTS_DIR}" not in f"/{name}"


def read_weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Global shapes of the tensors in a checkpoint's torch_dist weights, from the DCP metadata alone.

    Only `model_weights/.metadata` is extracted from a tar (no tensor data), so this is cheap for any model size,
    and it is read through the allowlist unpickler. Legacy layouts (no `model_weights/`) give `{}`.
    """
    path = Path(path)
    if path.is_dir():
        return _weight_shapes_in(path)
    wanted = PurePosixPath(MODEL_WEIGHTS_DIR, ".metadata")
    with tempfile.TemporaryDirectory(prefix="nemo_meta_") as tmp:
        _safe_extract(path, Path(tmp), select=lambda name: PurePosixPath(name) == wanted)
        return _weight_shapes_in(Path(tmp))


def _weight_shapes_in(root: Path) -> dict[str, tuple[int, ...]]:
    if not (root / MODEL_WEIGHTS_DIR / ".metadata").is_file():
        return {}
    metadata = read_dcp_metadata(root / MODEL_WEIGHTS_DIR)
    return {key: tuple(md.size) for key, md in metadata.state_dict_metadata.items() if hasattr(md, "size")}


def _require_model_config(unpacked_dir: Path, source: Path) -> None:
    if not (unpacked_dir / MODEL_CONFIG_FILE).is_file():
        raise NemoFormatError(f"{source}: no {MODEL_CONFIG_FILE} inside; not a .nemo checkpoint")


def _safe_extract(archive: Path, dest: Path, select: Callable[[str], bool] | None = None) -> None:
    """Extract `archive` into `dest` after checking every member, and check the tar was not cut short.

    `select(member_name)` limits extraction to some members (all are still checked).
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(archive, member)
            if select is not None:
                members = [m for m in members if m.isreg() and select(m.name)]
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, members=members, filter="data")
            else:
                tar.extractall(dest, members=members)
            _check_end_of_archive(archive, tar)
    except tarfile.FilterError as exc:
        raise NemoFormatError(f"{archive}: refusing unsafe tar member: {exc}") from exc
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise NemoFormatError(f"{archive}: file is truncated or not a .nemo tar archive ({exc})") from exc
    except OSError as exc:  # e.g. a member name longer than the file system allows, or a full disk
        member = os.path.relpath(exc.filename, dest) if isinstance(exc.filename, str) else "?"
        raise NemoFormatError(f"{archive}: cannot extract member {member!r}: {exc.strerror or exc}") from exc


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse absolute or `..` paths, links whose target could leave the directory, and device files/FIFOs."""
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise NemoFormatError(f"{archive}: refusing tar member {member.name!r}: path escapes the extraction directory")
    if member.issym() or member.islnk():
        # A target with no `..` and no leading `/` stays below the link's own (already checked) directory.
        target = PurePosixPath(member.linkname)
        if target.is_absolute() or ".." in target.parts:
            raise NemoFormatError(
                f"{archive}: refusing tar member {member.name!r}: link to {member.linkname!r} escapes the "
                "extraction directory"
            )
    elif not (member.isreg() or member.isdir()):
        raise NemoFormatError(f"{archive}: refusing tar member {member.name!r}: not a regular file or directory")


def _check_end_of_archive(archive: Path, tar: tarfile.TarFile) -> None:
    """Require the zero block that ends a tar: `tarfile` silently stops listing members at a cut header."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise NemoFormatError(f"{archive}: file is truncated or not a .nemo tar archive (no end-of-archive marker)")


def save_nemo(
    path: str | os.PathLike,
    model_config: DictConfig | Mapping[str, Any],
    write_weights: Callable[[Path], None],
    artifacts: Mapping[str, str | os.PathLike] | None = None,
    *,
    packed: bool = True,
) -> DictConfig:
    """Write a `.nemo` checkpoint atomically and return the config as written.

    `write_weights(weights_dir)` fills the given, existing and empty `model_weights/` directory (e.g. with
    megatron-core `dist_checkpointing.save(sharded_state_dict, weights_dir)`); it must write at least one file.
    `artifacts` maps dotted config keys (e.g. `"tokenizer.model"`) to local files: each is stored at the root as
    `<32-hex uuid>_<basename>` and the key is set to `nemo:<that name>`. Interpolations are resolved; `target` and
    other keys are kept. Every `nemo:` reference left in the config must name an artifact being saved.

    `packed=True` writes an uncompressed POSIX tar with members under `./` (what NeMo writes); `packed=False` writes
    the same content as a directory at `path` (NeMo reads both). Everything is built next to `path` and moved into
    place with a rename, so a failure never leaves a partial checkpoint at `path` (an existing one is replaced
    only on success).
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save .nemo checkpoint {path}: directory {path.parent} does not exist")
    if path.exists() and path.is_dir() == packed:
        kind = "a directory" if packed else "a file"
        raise FileExistsError(f"cannot save .nemo checkpoint {path}: {kind} is in the way")
    if not isinstance(model_config, DictConfig):
        model_config = OmegaConf.create(dict(model_config))
    cfg = OmegaConf.create(OmegaConf.to_container(model_config, resolve=True))

    staging = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for key, source in (artifacts or {}).items():
            source = Path(source)
            if not source.is_file():
                raise FileNotFoundError(f"artifact for config key {key!r} not found: {source}")
            name = f"{uuid.uuid4().hex}_{source.name}"
            shutil.copyfile(source, staging / name)
            OmegaConf.update(cfg, key, ARTIFACT_PREFIX + name, force_add=True)
        _map_artifact_refs(OmegaConf.to_container(cfg), lambda key, name: _artifact_file(staging, key, name))
        (staging / MODEL_CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")

        weights_dir = staging / MODEL_WEIGHTS_DIR
        weights_dir.mkdir()
        write_weights(weights_dir)
        if not any(weights_dir.iterdir()):
            raise ValueError(f"saving {path}: write_weights wrote nothing into {MODEL_WEIGHTS_DIR}/")

        if packed:
            _write_tar_atomically(staging, path)
        else:
            _replace_directory(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cfg


def _write_tar_atomically(source_dir: Path, path: Path) -> None:
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fileobj:
            with tarfile.open(fileobj=fileobj, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                tar.add(source_dir, arcname=".")
            fileobj.flush()
            os.fsync(fileobj.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _replace_directory(new_dir: Path, path: Path) -> None:
    """Move `new_dir` to `path`; an existing directory there is swapped out first and deleted afterwards."""
    if not path.exists():
        new_dir.rename(path)
        return
    old = path.parent / f".{path.name}.{uuid.uuid4().hex}.old"
    path.rename(old)
    new_dir.rename(path)
    shutil.rmtree(old)


# ---------------------------------------------------------------------------------------------------------------
# Config and artifacts
# ---------------------------------------------------------------------------------------------------------------


def read_model_config(unpacked_dir: str | os.PathLike) -> DictConfig:
    """Load `model_config.yaml` of an unpacked checkpoint as is (keeps `target`, `nemo_version` and the rest)."""
    config_path = Path(unpacked_dir) / MODEL_CONFIG_FILE
    if not config_path.is_file():
        raise NemoFormatError(f"{config_path} not found; not a .nemo checkpoint")
    try:
        cfg = OmegaConf.load(config_path)
    except Exception as exc:  # yaml and OmegaConf raise many unrelated types for a bad file
        raise NemoFormatError(f"{config_path}: cannot parse YAML ({exc})") from exc
    if not isinstance(cfg, DictConfig):
        raise NemoFormatError(f"{config_path}: expected a mapping at the top level, got a list")
    return cfg


def resolve_artifact_paths(cfg: DictConfig, unpacked_dir: str | os.PathLike) -> DictConfig:
    """Return a copy of `cfg` where every `nemo:<name>` string (at any depth) is the absolute path of that file.

    Raises NemoFormatError naming the config key if `<name>` is not a plain file name or the file is missing.
    """
    root = Path(unpacked_dir).resolve()
    container = OmegaConf.to_container(cfg, resolve=False)
    resolved = _map_artifact_refs(container, lambda key, name: str(_artifact_file(root, key, name)))
    return OmegaConf.create(resolved)


def _map_artifact_refs(node: Any, fn: Callable[[str, str], Any], key: str = "") -> Any:
    """Copy a plain config container, replacing each `nemo:<name>` string by `fn(dotted_key, name)`."""
    if isinstance(node, dict):
        return {k: _map_artifact_refs(v, fn, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_artifact_refs(v, fn, f"{key}.{i}") for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith(ARTIFACT_PREFIX):
        return fn(key, node[len(ARTIFACT_PREFIX) :])
    return node


def _artifact_file(root: Path, key: str, name: str) -> Path:
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise NemoFormatError(f"config key {key!r}: artifact {ARTIFACT_PREFIX}{name} is not a plain file name")
    file = root / name
    if not file.is_file():
        raise NemoFormatError(f"config key {key!r}: artifact {ARTIFACT_PREFIX}{name} not found in {root}")
    return file


# ---------------------------------------------------------------------------------------------------------------
# Weights layouts
# ---------------------------------------------------------------------------------------------------------------


def detect_weights_layout(unpacked_dir: str | os.PathLike) -> WeightsLayout:
    """Tell how the weights of an unpacked checkpoint are stored: `"torch_dist"` or `"legacy"`.

    `"torch_dist"` is returned only after `verify_torch_dist` passed, so the directory is safe to hand to
    megatron-core `dist_checkpointing.load`. Raises NemoFormatError for zarr, unknown backends or missing weights.
    """
    root = Path(unpacked_dir)
    weights_dir = root / MODEL_WEIGHTS_DIR
    if weights_dir.is_dir():
        backend = _sharded_backend(weights_dir)
        if backend == "zarr":
            raise NemoFormatError(
                f"{weights_dir}: NeMo 1.x zarr checkpoints are not supported; convert it to torch_dist with NeMo "
                "(restore_from + save_to, or scripts/checkpoint_converters/convert_zarr_to_torch_dist.py)"
            )
        if backend != "torch_dist":
            raise NemoFormatError(f"{weights_dir}: unsupported sharded_backend {backend!r}; expected 'torch_dist'")
        verify_torch_dist(weights_dir)
        return "torch_dist"
    if _legacy_weight_files(root):
        return "legacy"
    raise NemoFormatError(
        f"{root}: no model weights found; expected {MODEL_WEIGHTS_DIR}/metadata.json (torch_dist) or "
        f"{LEGACY_WEIGHTS_FILE}, mp_rank_XX/{LEGACY_WEIGHTS_FILE}, tp_rank_XX_pp_rank_YYY/{LEGACY_WEIGHTS_FILE}"
    )


def _sharded_backend(weights_dir: Path) -> Any:
    metadata_json = weights_dir / "metadata.json"
    if not metadata_json.is_file():
        raise NemoFormatError(f"{metadata_json} not found; {weights_dir} is not a megatron-core checkpoint")
    try:
        return json.loads(metadata_json.read_text(encoding="utf-8"))["sharded_backend"]
    except (ValueError, KeyError, TypeError) as exc:
        raise NemoFormatError(f"{metadata_json}: not a megatron-core metadata.json ({exc!r})") from exc


def _legacy_weight_files(root: Path) -> list[Path]:
    return sorted(
        [p for p in [root / LEGACY_WEIGHTS_FILE] if p.is_file()]
        + list(root.glob(f"mp_rank_*/{LEGACY_WEIGHTS_FILE}"))
        + list(root.glob(f"tp_rank_*_pp_rank_*/{LEGACY_WEIGHTS_FILE}"))
    )


def legacy_weights_path(
    unpacked_dir: str | os.PathLike, tp_rank: int = 0, pp_rank: int = 0, tp_size: int = 1, pp_size: int = 1
) -> Path:
    """Path of the legacy weights file NeMo uses for this model-parallel rank (existing or not)."""
    if not (0 <= tp_rank < tp_size and 0 <= pp_rank < pp_size):
        raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) outside the grid tp_size={tp_size}, pp_size={pp_size}")
    root = Path(unpacked_dir)
    if tp_size == 1 and pp_size == 1:
        return root / LEGACY_WEIGHTS_FILE
    if pp_size == 1:
        return root / f"mp_rank_{tp_rank:02d}" / LEGACY_WEIGHTS_FILE
    return root / f"tp_rank_{tp_rank:02d}_pp_rank_{pp_rank:03d}" / LEGACY_WEIGHTS_FILE


def load_legacy_state_dict(
    unpacked_dir: str | os.PathLike, tp_rank: int = 0, pp_rank: int = 0, tp_size: int = 1, pp_size: int = 1
) -> dict[str, torch.Tensor]:
    """Load one rank's legacy `model_weights.ckpt` (CPU, `weights_only=True`), dropping `_extra_state` entries.

    Keys are as saved; with `megatron_amp_O2` they start with `model.module.` (see `strip_o2_prefix`).
    `io.BytesIO` is allowed in addition to tensors because TransformerEngine stored its `_extra_state` that way.
    """
    file = legacy_weights_path(unpacked_dir, tp_rank, pp_rank, tp_size, pp_size)
    if not file.is_file():
        found = [str(p.relative_to(unpacked_dir)) for p in _legacy_weight_files(Path(unpacked_dir))]
        raise NemoFormatError(
            f"{file} not found for tp_size={tp_size}, pp_size={pp_size}; legacy weight files present: {found}"
        )
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise NemoFormatError(f"{file}: refusing to load, it needs unrestricted unpickling ({exc})") from exc
    if not isinstance(state_dict, Mapping):
        raise NemoFormatError(f"{file}: expected a state dict, got {type(state_dict).__name__}")
    weights = {}
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] == _EXTRA_STATE:
            continue
        if not isinstance(value, torch.Tensor):
            raise NemoFormatError(f"{file}: entry {key!r} is a {type(value).__name__}, not a tensor")
        weights[key] = value
    return weights


def strip_o2_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map `model.module.X` (how megatron_amp_O2 checkpoints name weights) to `model.X`; other keys are kept."""
    stripped: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new_key = "model." + key[len(_O2_PREFIX) :] if key.startswith(_O2_PREFIX) else key
        if new_key in stripped:
            raise ValueError(f"state dict has both {key!r} and its O2-stripped name {new_key!r}")
        stripped[new_key] = value
    return stripped


# ---------------------------------------------------------------------------------------------------------------
# torch_dist (megatron-core / torch DCP) weights
# ---------------------------------------------------------------------------------------------------------------

_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    # megatron-core pickles its save plans into the metadata as `all_local_plans`.
    "torch.distributed.checkpoint.planner": {"SavePlan", "WriteItem", "WriteItemType", "TensorWriteData"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "collections": {"OrderedDict"},
    # torch DCP stores the `checkpoint_id` it was saved with, which may be a Path.
    "pathlib": {"PosixPath", "PurePosixPath"},
}
# Looked up in the module dict, not with getattr, which could import torch submodules lazily.
_TORCH_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
# Classes defined by megatron-core only so old metadata unpickles; they carry nothing needed for reading.
_MEGATRON_PLACEHOLDERS = {
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP `.metadata` that resolves only the metadata dataclasses, enums, torch dtypes and sizes."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if (module, name) in _MEGATRON_PLACEHOLDERS:
            return types.SimpleNamespace
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise NemoFormatError(f"refusing to unpickle {module}.{name}: not a torch DCP metadata class")


def read_dcp_metadata(weights_dir: str | os.PathLike) -> Any:
    """Read a torch DCP `.metadata` pickle through an allowlist unpickler; returns its `Metadata`.

    Also checks that every storage entry points at a plain file name inside `weights_dir`.
    Raises NemoFormatError naming the file and, for a refused class, the class.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    metadata_file = Path(weights_dir) / ".metadata"
    if not metadata_file.is_file():
        raise NemoFormatError(f"{metadata_file} not found; not a torch_dist checkpoint")
    try:
        with open(metadata_file, "rb") as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except NemoFormatError as exc:
        raise NemoFormatError(f"{metadata_file}: {exc}") from None
    except Exception as exc:  # a corrupt pickle can fail in many ways; none may escape as a crash
        raise NemoFormatError(f"{metadata_file}: corrupt torch DCP metadata ({exc!r})") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise NemoFormatError(f"{metadata_file}: not a torch DCP file-system Metadata object")
    for index, info in metadata.storage_data.items():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or rel in ("", ".", "..") or "/" in rel or "\\" in rel:
            raise NemoFormatError(f"{metadata_file}: storage of {index.fqn!r} points outside the directory: {rel!r}")
    return metadata


def read_torch_dist_tensors(weights_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read the full (global, unsharded) tensors of a torch_dist `model_weights/` directory, on CPU.

    Uses plain `torch.distributed.checkpoint` with no process group. `_extra_state` and other byte entries are
    skipped, and never unpickled. Keys are the on-disk names: layer-stacked `[L, ...]`, TE-style.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    weights_dir = Path(weights_dir)
    metadata = read_dcp_metadata(weights_dir)
    tensors = {
        key: torch.empty(md.size, dtype=md.properties.dtype)
        for key, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    _dcp_load(weights_dir, metadata, tensors)
    return tensors


def verify_torch_dist(weights_dir: str | os.PathLike) -> None:
    """Check that megatron-core can load a torch_dist directory without running code from it.

    megatron-core (through torch DCP) unpickles `.metadata` and the byte entries (`_extra_state`, other objects)
    with no restriction. This reads `.metadata` through the allowlist unpickler, and each byte entry and
    `common.pt` with `torch.load(weights_only=True)`; any of them needing more is refused with NemoFormatError.
    The result holds only while nobody else can modify the directory (true for `open_nemo`'s temporary one).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    weights_dir = Path(weights_dir)
    metadata = read_dcp_metadata(weights_dir)
    byte_entries = {
        key: None for key, md in metadata.state_dict_metadata.items() if isinstance(md, BytesStorageMetadata)
    }
    _dcp_load(weights_dir, metadata, byte_entries)
    common = weights_dir / "common.pt"
    if common.is_file():
        try:
            torch.load(common, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise NemoFormatError(f"{common}: refusing, it needs unrestricted unpickling ({exc})") from exc


def _dcp_load(weights_dir: Path, metadata: Any, state_dict: dict[str, Any]) -> None:
    """Fill `state_dict` in place from a checked DCP directory, without a process group.

    The reader returns the already checked metadata (DCP would otherwise unpickle `.metadata` again, unchecked)
    and the planner loads byte entries with `weights_only=True` (DCP's default planner does not).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    class CheckedReader(dcp.FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return metadata

    class WeightsOnlyPlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            key = read_item.dest_index.fqn
            try:
                self.state_dict[key] = torch.load(value, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise NemoFormatError(
                    f"{weights_dir}: refusing entry {key!r}, it needs unrestricted unpickling ({exc})"
                ) from exc

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(
                state_dict,
                storage_reader=CheckedReader(weights_dir),
                planner=WeightsOnlyPlanner(flatten_state_dict=False),
                no_dist=True,
            )
    except CheckpointException as exc:
        causes = [failure[0] for failure in exc.failures.values()]
        for cause in causes:
            if isinstance(cause, NemoFormatError):
                raise cause from None
        raise NemoFormatError(f"{weights_dir}: cannot read torch_dist checkpoint ({causes})") from exc
