"""LoRA (Hu et al. 2021, arXiv 2106.09685) for the megatron-core GPT of ``MegatronGPTModel``.

A model whose config has ``peft.peft_scheme: lora`` is built with its adapters: :func:`lora_block_spec` puts
LoRA linears (megatron's ``ColumnParallelLinear``/``RowParallelLinear`` with an ``adapter`` submodule) into the
layer spec, so the base weights keep their names and checkpoint layout, and the model freezes every base weight.
megatron-core 0.16.1 has no LoRA of its own (only inference-side adapters).

An adapted linear computes ``y = W x + (alpha / r) * B A dropout(x)`` with the base ``W`` frozen and ``A`` ``[r, in]``,
``B`` ``[out, r]`` trained. Adapters attach to megatron's ``linear_qkv``, ``linear_proj``, ``linear_fc1`` and
``linear_fc2`` (NeMo's ``attention_qkv``, ``attention_dense``, ``mlp_fc1``, ``mlp_fc2``) and live inside
``model.model``, so megatron's DDP and optimizer see them like any other weight.

Tensor parallelism (each adapter's output has the layout of its base output on every rank):

* ColumnParallelLinear targets (qkv, fc1): ``A`` replicated ``[r, in]``; ``B`` sharded like the base weight
  ``[out/TP, r]``. ``A x`` enters the parallel region through ``copy_to_tensor_model_parallel_region`` (its
  gradient is all-reduced), so the replicated ``A`` gets the full gradient on every rank. For a gated MLP (SwiGLU)
  the rows of ``B`` on a rank are ``[gate shard; up shard]``, as fc1's own rows.
* RowParallelLinear targets (proj, fc2): ``A`` sharded on the input ``[r, in/TP]``; the partial products
  ``A_rank x_rank`` are summed by ``reduce_from_tensor_model_parallel_region``; ``B`` replicated ``[out, r]``.

Initial adapter weights are drawn whole (``[r, in]``, ``[out, r]``) from a generator seeded by ``model.seed``, the
layer and the target, then sliced: every TP/PP layout starts from the same adapters.

Checkpoints. ``model.sharded_state_dict()`` (trainer checkpoints) holds the adapters as one tensor per layer:
``model.decoder.layers.{i}.self_attention.linear_qkv.adapter.lora_a.weight`` (and ``.lora_b.``; likewise
``self_attention.linear_proj``, ``mlp.linear_fc1``, ``mlp.linear_fc2``), ``i`` the 0-based global layer number,
with the TP layout above (fc1's ``lora_b`` stored as ``[gate; up]``, as megatron stores fc1), so they reshard to
any TP/PP. :func:`save_lora_adapters` / :func:`load_lora_adapters` write and read just those tensors as a
megatron-core distributed checkpoint directory. ``model.save_to`` of a LoRA model writes the plain base model
(``.nemo`` weights never hold adapters); :func:`merge_lora_adapters` folds the adapters into the base weights first
when a merged ``.nemo`` is wanted. The reference policy of a LoRA run is the base model: ``reference.py`` switches
the adapters off (``LoRAAdapter.enabled``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from torch import nn

from nemo_aligner.checkpoint.nemo_file import NemoFormatError
from nemo_aligner.checkpoint.shapes import check_stored_shapes

logger = logging.getLogger(__name__)

# NeMo target name -> (path of the linear inside a TransformerLayer, its megatron class)
LORA_TARGETS: dict[str, tuple[str, type]] = {
    "attention_qkv": ("self_attention.linear_qkv", ColumnParallelLinear),
    "attention_dense": ("self_attention.linear_proj", RowParallelLinear),
    "mlp_fc1": ("mlp.linear_fc1", ColumnParallelLinear),
    "mlp_fc2": ("mlp.linear_fc2", RowParallelLinear),
}
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("attention_qkv", "attention_dense"),
    "mlp": ("mlp_fc1", "mlp_fc2"),
    "all": tuple(LORA_TARGETS),
}
# The values of examples/nlp/gpt/conf/gpt_dpo.yaml (NeMo's), for configs that leave a key out.
LORA_DEFAULTS: dict[str, Any] = {
    "target_modules": ["attention_qkv"],
    "adapter_dim": 32,
    "adapter_dropout": 0.0,
    "column_init_method": "xavier",
    "row_init_method": "zero",
    "layer_selection": None,
}
# NeMo's init methods (normal: std 0.2; kaiming: uniform with a = sqrt(5)).
INIT_METHODS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "xavier": lambda t, g: nn.init.xavier_normal_(t, generator=g),
    "normal": lambda t, g: nn.init.normal_(t, 0.0, 0.2, generator=g),
    "kaiming": lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
    "zero": lambda t, g: nn.init.zeros_(t),
}
_SCALE_KEY = "lora_scale"  # non-sharded entry of an adapter checkpoint: alpha / r


def resolve_target_modules(target_modules: Sequence[str] | str) -> tuple[str, ...]:
    """NeMo target names and groups (``attention``, ``mlp``, ``all``) -> the targets they cover, in layer order."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    wanted: set[str] = set()
    for name in names:
        if name in LORA_TARGETS:
            wanted.add(name)
        elif name in TARGET_GROUPS:
            wanted.update(TARGET_GROUPS[name])
        else:
            raise ValueError(
                f"model.peft.lora_tuning.target_modules: unknown target {name!r}; "
                f"choose from {list(LORA_TARGETS) + list(TARGET_GROUPS)}"
            )
    if not wanted:
        raise ValueError("model.peft.lora_tuning.target_modules is empty: name at least one target")
    return tuple(name for name in LORA_TARGETS if name in wanted)


def resolve_layer_selection(layer_selection: Sequence[int] | None, num_layers: int) -> tuple[int, ...]:
    """1-based layer numbers that get adapters (NeMo's ``layer_selection``; ``None`` = every layer)."""
    if layer_selection is None:
        return tuple(range(1, num_layers + 1))
    selection = sorted({int(n) for n in layer_selection})
    if not selection or selection[0] < 1 or selection[-1] > num_layers:
        raise ValueError(
            f"model.peft.lora_tuning.layer_selection={list(layer_selection)}: "
            f"give 1-based layer numbers between 1 and num_layers={num_layers}, or null for all layers"
        )
    return tuple(selection)


class LoRAAdapter(nn.Module):
    """``scale * B A dropout(x)`` for one tensor-parallel linear (see the module docstring for the TP layout).

    Args:
        lora_a: this rank's ``A`` (``[r, in]`` for a column target, ``[r, in/TP]`` for a row target).
        lora_b: this rank's ``B`` (``[out/TP, r]`` for a column target, ``[out, r]`` for a row target).
        scale: ``alpha / r``.
        dropout: dropout probability on the adapter's input.
        row_parallel: whether the base linear is a RowParallelLinear.
        swiglu: whether ``B``'s rows are fc1's ``[gate shard; up shard]``.
        tp_group: the base linear's tensor-parallel group.
        layer_index: 0-based global layer number (names the checkpoint tensors).
        module_path: the base linear's path in its layer, e.g. ``self_attention.linear_qkv``.
    """

    def __init__(
        self,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        *,
        scale: float,
        dropout: float,
        row_parallel: bool,
        swiglu: bool,
        tp_group: torch.distributed.ProcessGroup,
        layer_index: int,
        module_path: str,
    ):
        super().__init__()
        self.lora_a = _bias_free_linear(lora_a)
        self.lora_b = _bias_free_linear(lora_b)
        sharded, axis = (self.lora_a.weight, 1) if row_parallel else (self.lora_b.weight, 0)
        tensor_parallel.set_tensor_model_parallel_attributes(sharded, is_parallel=True, dim=axis, stride=1)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        self.row_parallel = row_parallel
        self.swiglu = swiglu
        self.tp_group = tp_group
        self.layer_index = layer_index
        self.module_path = module_path
        self.enabled = True  # False while the reference policy (the base model) is computed
        self.in_checkpoints = True  # False while save_to writes the base model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.lora_a(self._dropout(x))
        if self.row_parallel:  # partial products of the input shards: sum them (backward: identity)
            hidden = tensor_parallel.reduce_from_tensor_model_parallel_region(hidden, group=self.tp_group)
        else:  # the replicated A feeds this rank's rows of B: all-reduce A's gradient (forward: identity)
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        return self.lora_b(hidden) * self.scale

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout.p == 0.0 or not self.training:
            return x
        if self.row_parallel:
            # Each rank holds a different slice of x: its mask comes from the model-parallel RNG stream.
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.dropout(x)
        return self.dropout(x)  # x is replicated: the default stream gives every TP rank the same mask

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` in float32, shaped and sharded like the base weight on this rank."""
        return self.scale * (self.lora_b.weight.float() @ self.lora_a.weight.float())

    def sharded_state_dict(self, prefix: str, sharded_offsets: tuple, metadata: dict | None) -> dict:
        """``lora_a``/``lora_b`` as ShardedTensors keyed by the global layer number (no stacked layer axis).

        Layers may lack adapters (``layer_selection``), so adapters cannot share megatron's stacked
        ``decoder.layers.*`` tensors. When the block stacks layers (``sharded_offsets`` holds the layer axis) it
        renames ``layers.{local}.`` to ``layers.`` in every key afterwards: the global number goes after it.
        """
        suffix = f"{self.module_path}.adapter."
        if not prefix.endswith(suffix):
            raise ValueError(f"unexpected sharded-state prefix {prefix!r} for the adapter of {self.module_path}")
        head = prefix[: -len(suffix)]
        key_prefix = f"{head}{self.layer_index}.{suffix}" if sharded_offsets else prefix
        tp_rank = torch.distributed.get_rank(self.tp_group)
        tp_size = torch.distributed.get_world_size(self.tp_group)
        dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        state = {}
        for name in ("lora_a", "lora_b"):
            weight = getattr(self, name).weight
            key = f"{key_prefix}{name}.weight"
            if getattr(weight, "tensor_model_parallel", False):
                axis = weight.partition_dim
                sharded = ShardedTensor.from_rank_offsets(
                    key, weight, (axis, tp_rank, tp_size), replica_id=(0, 0, dp_rank)
                )
                if self.swiglu and name == "lora_b":
                    singleton = (metadata or {}).get("singleton_local_shards", False)
                    sharded = apply_swiglu_sharded_factory(sharded, (), singleton)
            else:
                sharded = ShardedTensor.from_rank_offsets(key, weight, replica_id=(0, tp_rank, dp_rank))
            state[f"{prefix}{name}.weight"] = sharded
        return state


@dataclass(frozen=True)
class AdapterSettings:
    """What an adapted linear needs to build its adapter (``ModuleSpec.params`` of the layer spec)."""

    rank: int
    alpha: float
    dropout: float
    init_a: str
    init_b: str
    seed: int
    layer_index: int  # 0-based global layer number
    target: str
    swiglu: bool

    def build(self, linear: nn.Module) -> LoRAAdapter:
        """The adapter of ``linear``: its initial weights drawn whole from a generator keyed by seed, layer and
        target (so every TP/PP layout starts from the same adapters), then sliced to this rank."""
        path, base_class = LORA_TARGETS[self.target]
        target_index = list(LORA_TARGETS).index(self.target)
        generator = torch.Generator(device="cpu").manual_seed(
            self.seed + len(LORA_TARGETS) * self.layer_index + target_index
        )
        init_a = _init_method(self.init_a, "column_init_method")
        init_b = _init_method(self.init_b, "row_init_method")
        lora_a, lora_b = _initial_adapter_weights(linear, self.rank, init_a, init_b, generator, self.swiglu)
        return LoRAAdapter(
            lora_a,
            lora_b,
            scale=self.alpha / self.rank,
            dropout=self.dropout,
            row_parallel=base_class is RowParallelLinear,
            swiglu=self.swiglu,
            tp_group=linear.tp_group,
            layer_index=self.layer_index,
            module_path=path,
        )


class _LoRALinearMixin:
    """A megatron linear built with a LoRA adapter at ``.adapter`` (added to its output); the base weight keeps
    its name and megatron's checkpoint layout. ``adapter`` is ``None`` once merged into the base weight."""

    adapter: LoRAAdapter | None

    def __init__(self, *args: Any, lora: AdapterSettings, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.adapter = lora.build(self)

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):
        output, bias = super().forward(input_, *args, **kwargs)
        if self.adapter is not None and self.adapter.enabled:
            output = output + self.adapter(input_)
        return output, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter_prefix = f"{prefix}adapter."
        state = {k: v for k, v in state.items() if not k.startswith(adapter_prefix)}  # megatron's replicated view
        if self.adapter is not None:
            state.update(self.adapter.sharded_state_dict(adapter_prefix, sharded_offsets, metadata))
        return state


class LoRAColumnParallelLinear(_LoRALinearMixin, ColumnParallelLinear):
    """A ColumnParallelLinear with a LoRA adapter at ``.adapter``."""


class LoRARowParallelLinear(_LoRALinearMixin, RowParallelLinear):
    """A RowParallelLinear with a LoRA adapter at ``.adapter``."""


_LORA_CLASSES = {ColumnParallelLinear: LoRAColumnParallelLinear, RowParallelLinear: LoRARowParallelLinear}


def lora_block_spec(block_spec: Any, peft_cfg: Mapping[str, Any] | None, config: Any, seed: int) -> Any:
    """The transformer-block spec of a model with ``model.peft`` (``peft_scheme: lora``): the targeted linears of
    the selected layers are built as LoRA linears (every setting is checked first). ``none`` returns
    ``block_spec`` itself.

    ``block_spec`` holds one layer spec per layer of this pipeline stage (``TransformerBlockSubmodules``).
    """
    peft_cfg = peft_cfg or {}
    scheme = peft_cfg.get("peft_scheme") or "none"
    if scheme == "none":
        return block_spec
    if scheme != "lora":
        raise ValueError(f"model.peft.peft_scheme={scheme!r}; choose 'lora' or 'none'")
    if config.sequence_parallel:
        raise ValueError("LoRA does not support model.sequence_parallel=True; set it to False")
    tuning = {**LORA_DEFAULTS, **{k: v for k, v in (peft_cfg.get("lora_tuning") or {}).items() if v is not None}}
    targets = resolve_target_modules(tuning["target_modules"])
    rank = int(tuning["adapter_dim"])
    if rank < 1:
        raise ValueError(f"model.peft.lora_tuning.adapter_dim={rank}: must be a positive integer")
    layers = set(resolve_layer_selection(tuning["layer_selection"], config.num_layers))
    _init_method(tuning["column_init_method"], "column_init_method")
    _init_method(tuning["row_init_method"], "row_init_method")
    offset = get_transformer_layer_offset(config)
    layer_specs = []
    for local_index, layer in enumerate(block_spec.layer_specs):
        number = offset + local_index + 1
        if number not in layers:
            layer_specs.append(layer)
            continue
        layer = copy.deepcopy(layer)
        for target in targets:
            path, base_class = LORA_TARGETS[target]
            parent, name = _spec_parent(layer, path)
            found = getattr(parent, name, None) if parent is not None else None
            if found is not base_class:
                raise ValueError(
                    f"model.peft.lora_tuning.target_modules: {target} needs megatron-core's {base_class.__name__} "
                    f"at layer {number} {path}, found {getattr(found, '__name__', type(found).__name__)} "
                    "(LoRA supports the local layer spec, model.transformer_engine=False, and dense MLPs)"
                )
            settings = AdapterSettings(
                rank=rank,
                alpha=float(tuning.get("alpha", rank)),
                dropout=float(tuning["adapter_dropout"]),
                init_a=tuning["column_init_method"],
                init_b=tuning["row_init_method"],
                seed=seed,
                layer_index=number - 1,
                target=target,
                swiglu=target == "mlp_fc1" and config.gated_linear_unit,
            )
            setattr(parent, name, ModuleSpec(module=_LORA_CLASSES[base_class], params={"lora": settings}))
        layer_specs.append(layer)
    logger.info("LoRA r=%d on %s of layers %s", rank, list(targets), sorted(layers))
    return dataclasses.replace(block_spec, layer_specs=layer_specs)


def _spec_parent(layer_spec: ModuleSpec, path: str) -> tuple[Any, str]:
    """The submodules object that holds the last part of ``path`` (``self_attention.linear_qkv``) in a layer spec."""
    *parents, name = path.split(".")
    node = layer_spec.submodules
    for part in parents:
        child = getattr(node, part, None)
        node = getattr(child, "submodules", None)
        if node is None:
            return None, name
    return node, name


def freeze_base_weights(model: nn.Module) -> None:
    """Only the adapters train: every other parameter of ``model`` (a megatron GPTModel) is frozen."""
    adapter_params = {
        id(p) for module in model.modules() if isinstance(module, LoRAAdapter) for p in module.parameters()
    }
    for param in model.parameters():
        param.requires_grad_(id(param) in adapter_params)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters on this rank", trainable, total)


def lora_adapters(model) -> dict[str, LoRAAdapter]:
    """The adapters of ``model`` (a MegatronGPTModel) by their module name inside ``model.model``."""
    return {
        f"{name}.adapter": module.adapter
        for name, module in model.model.named_modules()
        if isinstance(module, _LoRALinearMixin) and module.adapter is not None
    }


@torch.no_grad()
def merge_lora_adapters(model) -> None:
    """Fold ``scale * B @ A`` into every adapted base weight (on each rank's shard) and drop the adapters.

    Afterwards the model computes as a plain GPT (``save_to`` writes a full merged ``.nemo``); its weights stay
    frozen. For export: an optimizer built before still refers to the removed adapter parameters.
    """
    adapted = [module for module in model.model.modules() if isinstance(module, _LoRALinearMixin) and module.adapter]
    if not adapted:
        raise RuntimeError("merge_lora_adapters: the model has no LoRA adapters")
    if not all(module.adapter.enabled for module in adapted):
        raise RuntimeError("merge_lora_adapters cannot run while the adapters are switched off")
    for module in adapted:
        module.weight.add_(module.adapter.delta_weight().to(module.weight.dtype))
        module.adapter = None


def save_lora_adapters(model, path: str | Path) -> None:
    """Write only the adapters as a megatron-core distributed checkpoint directory (a collective call).

    The tensors are named as in the module docstring; they load at any TP/PP layout with :func:`load_lora_adapters`.
    """
    sharded = _adapter_sharded_state_dict(model)
    adapters = list(lora_adapters(model).values())
    common = {_SCALE_KEY: adapters[0].scale} if adapters else {}  # rank 0 writes it
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({**sharded, **common}, str(path))


def load_lora_adapters(model, path: str | Path) -> None:
    """Load adapters written by :func:`save_lora_adapters` (at any TP/PP layout) into ``model``'s adapters.

    The model's adapters (targets, ``adapter_dim``, ``layer_selection``, ``alpha``) must match the saved ones.
    """
    path = Path(path)
    stored_scale = dist_checkpointing.load_common_state_dict(str(path)).get(_SCALE_KEY)
    for adapter in lora_adapters(model).values():
        if stored_scale is not None and not math.isclose(stored_scale, adapter.scale):
            raise ValueError(
                f"{path}: adapters saved with alpha/adapter_dim={stored_scale:g}, the model uses {adapter.scale:g}; "
                "set model.peft.lora_tuning.alpha to match"
            )
    sharded = _adapter_sharded_state_dict(model)
    try:
        check_stored_shapes(_adapter_sharded_state_dict(model), path)
        loaded = dist_checkpointing.load(sharded, str(path), strict=StrictHandling.RAISE_ALL)
    except (NemoFormatError, CheckpointingException) as err:
        raise ValueError(
            f"{err}\nThe LoRA adapters of the model (model.peft.lora_tuning: target_modules, adapter_dim, "
            f"layer_selection) must match those saved in {path}"
        ) from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key in sharded:
            params[key].copy_(loaded[key])
    logger.info("Loaded %d LoRA tensors from %s", len(sharded), path)


def _adapter_sharded_state_dict(model) -> dict:
    """This rank's adapter entries of the model's sharded state dict (none on a stage without selected layers)."""
    if not lora_adapters(model):
        raise RuntimeError("the model has no LoRA adapters: build it with model.peft.peft_scheme=lora")
    return {k: v for k, v in model.sharded_state_dict().items() if ".adapter.lora_" in k}


def _init_method(name: str, key: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if name not in INIT_METHODS:
        raise ValueError(f"model.peft.lora_tuning.{key}={name!r}; choose one of {list(INIT_METHODS)}")
    return INIT_METHODS[name]


def _initial_adapter_weights(
    linear: nn.Module,
    rank: int,
    init_a: Callable,
    init_b: Callable,
    generator: torch.Generator,
    swiglu: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slices of ``A`` ``[r, in]`` and ``B`` ``[out, r]``, drawn whole so every TP layout agrees."""
    full_a = init_a(torch.empty(rank, linear.input_size, device="cpu"), generator)
    full_b = init_b(torch.empty(linear.output_size, rank, device="cpu"), generator)
    tp_size = torch.distributed.get_world_size(linear.tp_group)
    tp_rank = torch.distributed.get_rank(linear.tp_group)
    if isinstance(linear, RowParallelLinear):
        lora_a, lora_b = full_a.chunk(tp_size, dim=1)[tp_rank], full_b
    elif swiglu:
        gate, up = full_b.chunk(2, dim=0)
        lora_a, lora_b = full_a, torch.cat([gate.chunk(tp_size)[tp_rank], up.chunk(tp_size)[tp_rank]])
    else:
        lora_a, lora_b = full_a, full_b.chunk(tp_size, dim=0)[tp_rank]
    weight = linear.weight
    return (
        lora_a.to(device=weight.device, dtype=weight.dtype).contiguous(),
        lora_b.to(device=weight.device, dtype=weight.dtype).contiguous(),
    )


def _bias_free_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight)
    return linear
