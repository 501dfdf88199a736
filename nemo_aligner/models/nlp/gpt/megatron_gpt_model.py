"""``MegatronGPTModel``: our slim base for every GPT model of the library (NeMo's was removed upstream).

A LightningModule that owns a megatron-core ``GPTModel`` (at attribute ``model``, so weight names match
NeMo's ``model.decoder.layers...``), its tokenizer and its NeMo-style config. It gives the pieces every
algorithm needs: forward, per-token log-probs, state-dict helpers, distributed (sharded) checkpoints and
``.nemo`` save/restore. Loops live in ``nemo_aligner/algorithms``; losses in the subclasses and ``losses/``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
import shutil
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func
from omegaconf import DictConfig, OmegaConf, open_dict

from nemo_aligner.checkpoint import nemo_config, nemo_file
from nemo_aligner.checkpoint.shapes import check_stored_shapes
from nemo_aligner.checkpoint.vocab import padded_vocab_size
from nemo_aligner.models.nlp.gpt.lora import freeze_base_weights, lora_adapters, lora_block_spec
from nemo_aligner.models.nlp.gpt.model_config import layer_spec, transformer_config_from_model_cfg
from nemo_aligner.tokenizers import Tokenizer, build_tokenizer
from nemo_aligner.utils import mcore_compat
from nemo_aligner.utils.config import model_seed
from nemo_aligner.utils.cpu_support import device_rewrites_suspended, with_device_rewrites_suspended
from nemo_aligner.utils.device import current_device, model_device, to_device
from nemo_aligner.utils.distributed import is_global_rank_zero, require_model_parallel, seed_everything
from nemo_aligner.utils.kill_points import kill_point
from nemo_aligner.utils.logprobs import shifted_logprobs
from nemo_aligner.utils.optimization import build_lr_scheduler, build_optimizer, ddp_config_for

# forward_step(model, batch) -> (output_tensor, loss_func); loss_func(output) -> (loss_sum, count, metrics)
ForwardStep = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Callable]]

logger = logging.getLogger(__name__)

# True while restore_from builds a model whose weights a checkpoint is about to overwrite.
_building_for_restore = contextvars.ContextVar("building_for_restore", default=False)


@contextlib.contextmanager
def _weights_come_from_a_checkpoint():
    token = _building_for_restore.set(True)
    try:
        yield
    finally:
        _building_for_restore.reset(token)


def causal_attention_mask(seq_length: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[1, 1, S, S]`` bool mask, True where attention is *not* allowed (megatron's convention)."""
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool, device=device), diagonal=1)[None, None]


def default_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)


def forward_tokens(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """One forward of a megatron GPT (or a pipeline chunk) over right-padded token rows ``[B, S]``: positions
    ``0..S-1`` and the causal mask (right padding needs no other mask)."""
    return module(
        input_ids=input_ids,
        position_ids=default_position_ids(input_ids),
        attention_mask=causal_attention_mask(input_ids.shape[1], input_ids.device),
    )


class MegatronGPTModel(LightningModule):
    """A megatron-core GPT built from a NeMo model config (``model_config.yaml`` keys).

    Built inside megatron-core's parallel state, which the launcher initialises first (a run's recipe does; a
    script calls :func:`~nemo_aligner.utils.distributed.initialize_distributed`).

    Args:
        cfg: the model config (``num_layers``, ``hidden_size``, ``tokenizer``, ...).
        trainer: the Lightning trainer that launched the job (optional; loops are ours).
        tokenizer: an already-built tokenizer; built from ``cfg.tokenizer`` when omitted.
    """

    def __init__(self, cfg: DictConfig | dict, trainer: Any = None, tokenizer: Tokenizer | None = None):
        super().__init__()
        cfg = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
        self.cfg = cfg
        self._launcher = trainer
        self.seed = model_seed(cfg)
        # megatron-core's parallel state is the launcher's (recipes.common, or initialize_distributed in a script):
        # the model is built inside it and only checks that it fits this config.
        require_model_parallel(cfg)
        self.tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg.tokenizer)
        self._artifact_dir: str | None = None  # owned copy of a restored checkpoint's tokenizer files
        self.padded_vocab_size = cfg.get("override_vocab_size") or padded_vocab_size(
            self.tokenizer.vocab_size,
            cfg.get("make_vocab_size_divisible_by", 128) or 128,
            parallel_state.get_tensor_model_parallel_world_size(),
        )
        # Where the weights are made (docs/megatron_cpu.md, "Devices"): a fresh model draws its initial weights on
        # the CPU (the same weights for every TP layout and device, from the configured seed) and then moves its
        # shard to the device; a model restored from a checkpoint allocates its shard directly on the device
        # (megatron's own initialisation, soon overwritten): no host copy of the weights before the load.
        self.transformer_config = transformer_config_from_model_cfg(
            cfg, cpu_initialization=not _building_for_restore.get()
        )
        seed_everything(self.seed)
        config = self.transformer_config
        self.model = mcore_compat.GPTModel(
            config=config,
            transformer_layer_spec=lora_block_spec(  # LoRA adapters, when model.peft asks for them
                layer_spec(cfg, config), cfg.get("peft"), config, self.seed
            ),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=cfg.get("max_position_embeddings") or cfg.encoder_seq_length,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.get("share_embeddings_and_output_weights", True),
            position_embedding_type=cfg.get("position_embedding_type", "learned_absolute"),
            rotary_percent=cfg.get("rotary_percentage", 1.0),
            rotary_base=cfg.get("rotary_base", 10000),
            seq_len_interpolation_factor=cfg.get("seq_len_interpolation_factor"),
            rope_scaling=cfg.get("scale_positional_embedding", False),
            rope_scaling_factor=cfg.get("rope_scaling_factor", 8.0),
        )
        if lora_adapters(self):
            freeze_base_weights(self.model)
        # Parameters and buffers (RoPE frequencies, learned positions) on this rank's accelerator; a no-op on the
        # CPU and for what megatron already allocated there.
        self.model.to(current_device())
        # bf16/fp16 mixed precision without O2 keeps fp32 weights and computes under autocast.
        self.autocast_dtype = (
            None
            if self.transformer_config.params_dtype != torch.float32
            else (
                torch.bfloat16
                if self.transformer_config.bf16
                else torch.float16
                if self.transformer_config.fp16
                else None
            )
        )

    # ------------------------------------------------------------------ forward and log-probs
    @property
    def encoder_seq_length(self) -> int:
        return int(self.cfg.encoder_seq_length)

    def to_model_device(self, value: Any) -> Any:
        """``value`` (a batch: tensors, possibly nested) on this model's device; data loaders collate on the CPU."""
        return to_device(value, model_device(self.model))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Vocab-parallel logits ``[B, S, V_padded / TP]`` of the whole model in this process (no pipeline).

        ``attention_mask`` is megatron's bool mask (True = blocked), ``[1|B, 1, S, S]``; causal by default.
        Right padding needs no extra mask: padded positions come after every real token. Under pipeline
        parallelism a stage holds only some layers: use :meth:`forward_backward` or :meth:`generate`.
        """
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            raise RuntimeError(
                "MegatronGPTModel.forward/get_logprobs need the whole model in one process; with "
                "model.pipeline_model_parallel_size > 1 use forward_backward (training, log-probs) or generate"
            )
        device = model_device(self.model)
        input_ids, position_ids, attention_mask = to_device((input_ids, position_ids, attention_mask), device)
        if position_ids is None:
            position_ids = default_position_ids(input_ids)
        if attention_mask is None:
            attention_mask = causal_attention_mask(input_ids.shape[1], device)
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask)

    def get_logprobs(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-token log-probs ``[B, S-1]``: entry t is ``log p(input_ids[:, t+1] | input_ids[:, :t+1])``.

        Computed on the model's device (inputs are moved there), like :meth:`forward`.
        """
        logits = self(input_ids, position_ids, attention_mask)
        return shifted_logprobs(logits, input_ids.to(logits.device))

    def generate(
        self,
        prompts: list[list[int]],
        sampling_params: DictConfig | dict,
        length_params: DictConfig | dict,
        seeds: list[int] | None = None,
    ) -> Any:
        """KV-cached generation (a ``GenerationOutput``); see :func:`nemo_aligner.generation.generate`."""
        from nemo_aligner.generation import generate

        return generate(self, prompts, sampling_params, length_params, seeds)

    # ------------------------------------------------------------------ training
    def setup_optimization(self, optim_cfg: DictConfig | dict, max_steps: int, gradient_clip_val: float = 0.0):
        """Wrap the model in megatron-core's DDP and build its optimizer and LR schedule.

        Losses are reported to megatron's schedules as ``(sum, count)`` and gradients are divided by the count
        summed over the whole global batch (all micro batches and data-parallel ranks), so a step does not
        depend on the micro batch size or the number of data-parallel ranks.
        """
        config = self.transformer_config  # calculate_per_token_loss is set where it is built (model_config.py)
        ddp_model = DistributedDataParallel(config=config, ddp_config=ddp_config_for(optim_cfg), module=self.model)
        # A list keeps the wrapper out of this module's registered children (and out of its state dict).
        self.ddp_model_chunks = [ddp_model]
        self.optimizer = build_optimizer(optim_cfg, config, self.ddp_model_chunks, gradient_clip_val)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, optim_cfg, max_steps)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss
        config.no_sync_func = ddp_model.no_sync
        return self.optimizer, self.lr_scheduler

    def model_chunks(self) -> list[torch.nn.Module]:
        return getattr(self, "ddp_model_chunks", None) or [self.model]

    def forward_backward(
        self,
        microbatches: Iterable[Any],
        num_microbatches: int,
        forward_step: ForwardStep,
        forward_only: bool,
        seq_length: int,
        micro_batch_size: int,
    ) -> list[dict]:
        """Run megatron-core's (pipeline) schedule over ``microbatches``; returns each micro batch's metrics.

        Every pipeline stage reads the same micro batches. Metrics come only from the last stage.
        """
        data_iterator = iter(microbatches)

        device = model_device(self.model)

        def step_func(iterator, model):
            # Micro batches come from the CPU data loader: every tensor in them goes to the model's device here.
            batch = to_device(next(iterator), device)
            with device_rewrites_suspended():  # the forward makes no CUDA request (cpu_support); GPUs: no-op
                output, loss_func = forward_step(model, batch)
            return output, with_device_rewrites_suspended(loss_func)

        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            return get_forward_backward_func()(
                forward_step_func=step_func,
                data_iterator=data_iterator,
                model=self.model_chunks(),
                num_microbatches=num_microbatches,
                seq_length=seq_length,
                micro_batch_size=micro_batch_size,
                forward_only=forward_only,
            )

    def prepare_for_training_step(self) -> None:
        self.train()
        self.zero_grad_buffers()

    def prepare_for_validation_step(self) -> None:
        self.eval()

    def finish_validation_step(self) -> None:
        self.train()

    def zero_grad_buffers(self) -> None:
        for chunk in self.model_chunks():
            if hasattr(chunk, "zero_grad_buffer"):
                chunk.zero_grad_buffer()
        self.optimizer.zero_grad()

    def optimizer_step(self) -> tuple[bool, float | None]:
        """One optimizer + LR-schedule step; returns (whether the update happened, gradient norm)."""
        success, grad_norm, _ = self.optimizer.step()
        if success:
            self.lr_scheduler.step(increment=1)
        return success, grad_norm

    # ------------------------------------------------------------------ state dicts
    def weights_sharded_state_dict(self, prefix: str = "") -> dict:
        """megatron-core sharded state dict of the weights, with NeMo's names (``model.decoder...``): a ``.nemo``
        (the plain model: LoRA adapters stay out)."""
        state = self.model.sharded_state_dict(prefix=f"{prefix}model.")
        return {k: v for k, v in state.items() if ".adapter." not in k}

    def sharded_state_dict(self, prefix: str = "") -> dict:
        """What a trainer checkpoint stores for this model: the weights and LoRA adapters (subclasses add e.g. a
        reference policy)."""
        return self.model.sharded_state_dict(prefix=f"{prefix}model.")

    def model_state_dict_in_cpu(self) -> dict[str, torch.Tensor]:
        """A detached CPU copy of this rank's weights (the reference-policy snapshot of DPO/SPIN)."""
        state = self.model.state_dict(prefix="model.")
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if isinstance(v, torch.Tensor)}

    def load_model_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy ``model.*`` weights (as from :meth:`model_state_dict_in_cpu`) into this rank's model."""
        prefix = "model."
        own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not any(".adapter." in k for k in own):  # plain weights (a .nemo) into a LoRA model: adapters stay
            own.update({k: v for k, v in self.model.state_dict().items() if ".adapter." in k})
        self.model.load_state_dict(own, strict=strict)

    def load_weights_from_distributed_checkpoint(self, weights_dir: str | Path, strict: bool = True) -> None:
        """Load weights saved with megatron-core distributed checkpointing (any TP/PP layout) into this model."""
        from megatron.core.dist_checkpointing.validation import StrictHandling

        check_stored_shapes(self.weights_sharded_state_dict(), Path(weights_dir))
        sharded = self.weights_sharded_state_dict()
        strictness = StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_UNEXPECTED
        loaded = dist_checkpointing.load(sharded, str(weights_dir), strict=strictness)
        self.load_model_state_dict(loaded, strict=strict)

    def save_weights_to_distributed_checkpoint(self, weights_dir: str | Path) -> None:
        """Write this model's weights (every rank's shard) as a torch_dist checkpoint; a collective call."""
        Path(weights_dir).mkdir(parents=True, exist_ok=True)
        dist_checkpointing.save(self.weights_sharded_state_dict(), str(weights_dir))
        kill_point("nemo_export")

    # ------------------------------------------------------------------ .nemo files
    def save_to(self, save_path: str | Path, packed: bool = True) -> None:
        """Write this model as a NeMo-compatible ``.nemo`` (tar; or a directory with ``packed=False``).

        A collective call: every rank writes its weight shards into the staging directory that rank 0 creates,
        then rank 0 packs it. The file appears atomically, whatever happens mid-way.
        """
        import torch.distributed as dist

        if lora_adapters(self):
            logger.warning(
                "save_to(%s) writes the base model without its LoRA adapters: save them with save_lora_adapters, "
                "or call merge_lora_adapters first for a merged model",
                save_path,
            )
        cfg, artifacts = self._config_and_artifacts_for_saving()
        if dist.get_world_size() == 1:
            nemo_file.save_nemo(save_path, cfg, self.save_weights_to_distributed_checkpoint, artifacts, packed=packed)
            return

        def write_weights_collectively(weights_dir: Path) -> None:
            dist.broadcast_object_list([str(weights_dir)], src=0)
            self.save_weights_to_distributed_checkpoint(weights_dir)
            dist.barrier()

        if is_global_rank_zero():
            nemo_file.save_nemo(save_path, cfg, write_weights_collectively, artifacts, packed=packed)
        else:
            received = [None]
            dist.broadcast_object_list(received, src=0)
            self.save_weights_to_distributed_checkpoint(received[0])
            dist.barrier()
        dist.barrier()

    def _config_and_artifacts_for_saving(self) -> tuple[DictConfig, dict[str, str]]:
        """The config to store (in the form NVIDIA NeMo restores) and the tokenizer files that travel with it."""
        return nemo_config.config_for_nemo(self.cfg, self.tokenizer)

    @classmethod
    def restore_from(
        cls,
        restore_path: str | Path,
        override_config_path: DictConfig | dict | str | Path | None = None,
        trainer: Any = None,
        strict: bool = True,
        return_config: bool = False,
        **model_kwargs: Any,
    ):
        """Build a model from a ``.nemo`` file or directory and load its weights (at any TP/PP layout).

        ``override_config_path`` is a full model config (object or YAML path) used instead of the stored one, as
        in NeMo; see :func:`nemo_aligner.utils.utils.load_and_override_model_config` to merge overrides instead.
        With ``return_config=True`` only the stored config is returned (nothing is built).
        """
        with nemo_file.open_nemo(restore_path) as unpacked:
            stored_cfg = nemo_file.read_model_config(unpacked)
            if return_config:
                return stored_cfg
            cfg = (
                _as_config(override_config_path) if override_config_path is not None else plain_model_config(stored_cfg)
            )
            artifact_dir = nemo_file.scratch_dir("nemo_aligner_artifacts_")  # removed at exit at the latest
            cfg = _with_owned_artifacts(cfg, unpacked, artifact_dir)
            layout = nemo_file.detect_weights_layout(unpacked)
            if layout == "torch_dist":
                cfg = _with_stored_vocab_size(cfg, unpacked / nemo_file.MODEL_WEIGHTS_DIR)
            with _weights_come_from_a_checkpoint():
                model = cls(cfg, trainer=trainer, **model_kwargs)
            model._artifact_dir = artifact_dir
            weakref.finalize(model, shutil.rmtree, artifact_dir, True)
            model._load_weights_from_unpacked(unpacked, layout, strict, source=restore_path)
        logger.info("Restored %s from %s", cls.__name__, restore_path)
        return model

    def _load_weights_from_unpacked(self, unpacked: Path, layout: str, strict: bool, source) -> None:
        try:
            if layout == "torch_dist":
                self.load_weights_from_distributed_checkpoint(unpacked / nemo_file.MODEL_WEIGHTS_DIR, strict=strict)
                return
            tp, pp = (
                parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size(),
            )
            state_dict = nemo_file.load_legacy_state_dict(
                unpacked,
                tp_rank=parallel_state.get_tensor_model_parallel_rank(),
                pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
                tp_size=tp,
                pp_size=pp,
            )
            self.load_model_state_dict(nemo_file.strip_o2_prefix(state_dict), strict=strict)
        except nemo_file.NemoFormatError as err:
            raise nemo_file.NemoFormatError(f"{source}: {err}") from None
        except (RuntimeError, KeyError, ValueError) as err:
            raise nemo_file.NemoFormatError(
                f"{source}: the stored weights do not fit the model built from its config "
                f"(architecture or shape mismatch): {err}"
            ) from err


def plain_model_config(checkpoint_cfg: DictConfig) -> DictConfig:
    """A checkpoint's model config without its ``peft`` section: a ``.nemo`` holds plain weights (a LoRA run writes
    its base or merged model), so building from it must not add adapters; a run that wants them says so."""
    if "peft" not in checkpoint_cfg:
        return checkpoint_cfg
    cfg = checkpoint_cfg.copy()
    with open_dict(cfg):
        cfg.pop("peft")
    return cfg


def _with_stored_vocab_size(cfg: DictConfig, weights_dir: Path) -> DictConfig:
    """Keep the checkpoint's padded vocabulary size when loading at another tensor-parallel size.

    NeMo pads the vocabulary to a multiple of ``make_vocab_size_divisible_by x TP``, so the same model would get
    a different embedding size at another TP. The stored rows are reused whenever TP divides them.
    """
    if cfg.get("override_vocab_size"):
        return cfg
    stored = nemo_file.read_dcp_metadata(weights_dir).state_dict_metadata.get("model.embedding.word_embeddings.weight")
    tp = int(cfg.get("tensor_model_parallel_size", 1) or 1)
    if stored is None or stored.size[0] % tp != 0:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.override_vocab_size = int(stored.size[0])
    return cfg


def _as_config(value: DictConfig | dict | str | Path) -> DictConfig:
    if isinstance(value, (str, Path)):
        return OmegaConf.load(value)
    return value if isinstance(value, DictConfig) else OmegaConf.create(value)


def _with_owned_artifacts(cfg: DictConfig, unpacked: Path, artifact_dir: str) -> DictConfig:
    """Copy the ``nemo:`` artifacts the config refers to into ``artifact_dir`` and point the config at them.

    The unpacked tar is temporary; the model keeps its tokenizer files so it can be saved again later.
    """
    resolved = nemo_file.resolve_artifact_paths(cfg, unpacked)
    original = OmegaConf.to_container(cfg, resolve=False)
    tokenizer = resolved.get("tokenizer") or {}
    for key, value in tokenizer.items() if tokenizer else []:
        raw = (original.get("tokenizer") or {}).get(key)
        if isinstance(raw, str) and raw.startswith(nemo_file.ARTIFACT_PREFIX):
            # Drop the uuid prefix of the stored name; saving adds a fresh one.
            target = Path(artifact_dir) / re.sub(r"^[0-9a-f]{32}_", "", Path(value).name)
            shutil.copyfile(value, target)
            resolved.tokenizer[key] = str(target)
    return resolved
