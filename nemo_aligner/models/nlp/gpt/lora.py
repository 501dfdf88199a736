"""LoRA (Hu et al. 2021, arXiv 2106.09685) for the megatron-core GPT of :class:`MegatronGPTModel`.

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
megatron-core distributed checkpoint directory. ``model.save_to`` of a LoRA model writes the plain base model;
:func:`merge_lora_adapters` folds the adapters into the base weights first when a merged ``.nemo`` is wanted.
"""

from __future__ import annotations

import contextlib
import logging
import math
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from torch import nn

from nemo_aligner.checkpoint.nemo_file import NemoFormatError
from nemo_aligner.models.nlp.gpt.megatron_gpt_model import MegatronGPTModel, _check_stored_shapes

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
        self.enabled = True  # False inside lora_adapters_disabled()
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


class _LoRALinearMixin:
    """Adds ``self.adapter``'s output to a megatron linear's output and gives its sharded state.

    :func:`apply_lora` swaps an adapted linear's class for a subclass with this mixin (as
    ``torch.nn.utils.parametrize`` does), so the base weight keeps its name and megatron's checkpoint layout.
    """

    adapter: LoRAAdapter

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):
        output, bias = super().forward(input_, *args, **kwargs)
        if self.adapter.enabled:
            output = output + self.adapter(input_)
        return output, bias

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        adapter_prefix = f"{prefix}adapter."
        state = {k: v for k, v in state.items() if not k.startswith(adapter_prefix)}  # megatron's replicated view
        if self.adapter.in_checkpoints:
            state.update(self.adapter.sharded_state_dict(adapter_prefix, sharded_offsets, metadata))
        return state


class LoRAColumnParallelLinear(_LoRALinearMixin, ColumnParallelLinear):
    """A ColumnParallelLinear with a LoRA adapter at ``.adapter``."""


class LoRARowParallelLinear(_LoRALinearMixin, RowParallelLinear):
    """A RowParallelLinear with a LoRA adapter at ``.adapter``."""


_LORA_CLASSES = {ColumnParallelLinear: LoRAColumnParallelLinear, RowParallelLinear: LoRARowParallelLinear}
_BASE_CLASSES = {lora: base for base, lora in _LORA_CLASSES.items()}


def apply_lora(model: MegatronGPTModel, peft_cfg: Mapping[str, Any]) -> list[str]:
    """Add LoRA adapters to ``model`` from its ``model.peft`` config; freeze every base weight.

    Call it after the base weights are loaded and BEFORE ``model.setup_optimization`` (megatron's DDP and
    optimizer only take the parameters that require gradients when they are built). ``peft_scheme: none`` leaves
    the model untouched. Afterwards ``model.lora_adapters_disabled()`` is a context in which the model computes
    the base model exactly (DPO's reference policy), and ``model.save_to`` writes the base model without adapters.
    ``model.peft.restore_from_path`` (optional) names an adapter checkpoint of :func:`save_lora_adapters` to load.

    Returns the adapted linears' names inside ``model.model``.
    """
    scheme = peft_cfg.get("peft_scheme") or "none"
    if scheme == "none":
        return []
    if scheme != "lora":
        raise ValueError(f"model.peft.peft_scheme={scheme!r}; choose 'lora' or 'none'")
    if hasattr(model, "lora_adapters_disabled"):
        raise RuntimeError("apply_lora: this model already has LoRA adapters")
    if getattr(model, "ddp_model_chunks", None):
        raise RuntimeError(
            "apply_lora must run before model.setup_optimization (the optimizer would miss the adapters)"
        )
    config = model.transformer_config
    if config.sequence_parallel:
        raise ValueError("LoRA does not support model.sequence_parallel=True; set it to False")

    tuning = {**LORA_DEFAULTS, **{k: v for k, v in (peft_cfg.get("lora_tuning") or {}).items() if v is not None}}
    targets = resolve_target_modules(tuning["target_modules"])
    rank = int(tuning["adapter_dim"])
    if rank < 1:
        raise ValueError(f"model.peft.lora_tuning.adapter_dim={rank}: must be a positive integer")
    alpha = float(tuning.get("alpha", rank))
    layers = set(resolve_layer_selection(tuning["layer_selection"], config.num_layers))
    init_a = _init_method(tuning["column_init_method"], "column_init_method")
    init_b = _init_method(tuning["row_init_method"], "row_init_method")
    seed = int(model.cfg.get("seed", 1234))

    chosen = [  # every target is found and checked before the model changes
        (local_index, layer, target_index, target, _target_linear(layer, *LORA_TARGETS[target], target))
        for local_index, layer in enumerate(model.model.decoder.layers)
        if layer.layer_number in layers
        for target_index, target in enumerate(LORA_TARGETS)
        if target in targets
    ]
    for param in model.model.parameters():
        param.requires_grad_(False)
    adapted = []
    for local_index, layer, target_index, target, linear in chosen:
        path, base_class = LORA_TARGETS[target]
        layer_index = layer.layer_number - 1
        generator = torch.Generator(device="cpu").manual_seed(seed + len(LORA_TARGETS) * layer_index + target_index)
        swiglu = target == "mlp_fc1" and config.gated_linear_unit
        lora_a, lora_b = (
            w.to(linear.weight.device)
            for w in _initial_adapter_weights(linear, rank, init_a, init_b, generator, swiglu)
        )
        linear.__class__ = _LORA_CLASSES[base_class]
        linear.adapter = LoRAAdapter(
            lora_a,
            lora_b,
            scale=alpha / rank,
            dropout=float(tuning["adapter_dropout"]),
            row_parallel=base_class is RowParallelLinear,
            swiglu=swiglu,
            tp_group=linear.tp_group,
            layer_index=layer_index,
            module_path=path,
        )
        adapted.append(f"decoder.layers.{local_index}.{path}")

    model.lora_adapters_disabled = types.MethodType(lora_adapters_disabled, model)
    model.save_to = types.MethodType(_save_base_model_to, model)
    trainable = sum(p.numel() for p in model.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.model.parameters())
    logger.info(
        "LoRA r=%d alpha=%g on %s of layers %s: %d trainable of %d parameters on this rank",
        rank,
        alpha,
        list(targets),
        sorted(layers),
        trainable,
        total,
    )
    if peft_cfg.get("restore_from_path"):
        load_lora_adapters(model, peft_cfg["restore_from_path"])
    return adapted


def lora_adapters(model: MegatronGPTModel) -> dict[str, LoRAAdapter]:
    """The adapters of ``model`` by their module name inside ``model.model``."""
    return {
        f"{name}.adapter": module.adapter
        for name, module in model.model.named_modules()
        if isinstance(module, _LoRALinearMixin)
    }


@contextlib.contextmanager
def lora_adapters_disabled(model: MegatronGPTModel) -> Iterator[None]:
    """Inside, ``model`` computes its base model exactly (the adapters are skipped, not zeroed)."""
    adapters = list(lora_adapters(model).values())
    previous = [adapter.enabled for adapter in adapters]
    for adapter in adapters:
        adapter.enabled = False
    try:
        yield
    finally:
        for adapter, enabled in zip(adapters, previous):
            adapter.enabled = enabled


@torch.no_grad()
def merge_lora_adapters(model: MegatronGPTModel) -> None:
    """Fold ``scale * B @ A`` into every adapted base weight (on each rank's shard) and remove the adapters.

    Afterwards the model is a plain GPT again (``save_to`` writes a full merged ``.nemo``); its weights stay frozen.
    For export: an optimizer built before still refers to the removed adapter parameters.
    """
    adapted = [module for module in model.model.modules() if isinstance(module, _LoRALinearMixin)]
    if not adapted:
        raise RuntimeError("merge_lora_adapters: the model has no LoRA adapters")
    if not all(module.adapter.enabled for module in adapted):
        raise RuntimeError("merge_lora_adapters cannot run inside lora_adapters_disabled()")
    for module in adapted:
        module.weight.add_(module.adapter.delta_weight().to(module.weight.dtype))
        del module.adapter
        module.__class__ = _BASE_CLASSES[type(module)]
    del model.lora_adapters_disabled
    del model.save_to


def save_lora_adapters(model: MegatronGPTModel, path: str | Path) -> None:
    """Write only the adapters as a megatron-core distributed checkpoint directory (a collective call).

    The tensors are named as in the module docstring; they load at any TP/PP layout with :func:`load_lora_adapters`.
    """
    sharded = _adapter_sharded_state_dict(model)
    adapters = list(lora_adapters(model).values())
    common = {_SCALE_KEY: adapters[0].scale} if adapters else {}  # rank 0 writes it
    Path(path).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({**sharded, **common}, str(path))


def load_lora_adapters(model: MegatronGPTModel, path: str | Path) -> None:
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
        _check_stored_shapes(_adapter_sharded_state_dict(model), path)
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


def _adapter_sharded_state_dict(model: MegatronGPTModel) -> dict:
    """This rank's adapter entries of the model's sharded state dict (none on a stage without selected layers)."""
    if not hasattr(model, "lora_adapters_disabled"):
        raise RuntimeError("the model has no LoRA adapters: call apply_lora first")
    return {k: v for k, v in model.sharded_state_dict().items() if ".adapter.lora_" in k}


def _save_base_model_to(model: MegatronGPTModel, save_path: str | Path, packed: bool = True) -> None:
    """``save_to`` of a LoRA model: the base model without adapters (a normal ``.nemo``)."""
    logger.warning(
        "save_to(%s) writes the base model without its LoRA adapters: save them with save_lora_adapters, "
        "or call merge_lora_adapters first for a merged model",
        save_path,
    )
    adapters = list(lora_adapters(model).values())
    for adapter in adapters:
        adapter.in_checkpoints = False
    try:
        type(model).save_to(model, save_path, packed=packed)
    finally:
        for adapter in adapters:
            adapter.in_checkpoints = True


def _init_method(name: str, key: str) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    if name not in INIT_METHODS:
        raise ValueError(f"model.peft.lora_tuning.{key}={name!r}; choose one of {list(INIT_METHODS)}")
    return INIT_METHODS[name]


def _target_linear(layer: nn.Module, path: str, expected: type, target: str) -> nn.Module:
    try:
        linear = layer.get_submodule(path)
    except AttributeError:
        linear = None
    if type(linear) is not expected:
        raise ValueError(
            f"model.peft.lora_tuning.target_modules: {target} needs megatron-core's {expected.__name__} at "
            f"layer {layer.layer_number} {path}, found {type(linear).__name__} "
            "(LoRA supports the local layer spec, model.transformer_engine=False, and dense MLPs)"
        )
    assert not getattr(linear, "gather_output", False) and getattr(linear, "input_is_parallel", True)
    return linear


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
