"""Sharded data-parallel training of a qoq policy: FSDP presets that know the policy's layers.

Lightning's ``FSDPStrategy`` needs an auto-wrap policy (which module classes become FSDP units), a
mixed-precision config and activation-checkpointing classes, all as Python objects. :class:`PolicyFSDPStrategy`
takes them as plain config values and finds the layer classes itself: every layer class the HF models in
the module declare (``_no_split_modules``: Qwen2 / Qwen2.5-VL decoder layers, Qwen2.5-VL vision blocks)
and the encoders' transformer blocks (timm ViT ``Block``, ``nn.TransformerEncoderLayer``).

:class:`CPUFSDPStrategy` is the same code on CPU processes with gloo (Lightning's own FSDP refuses CPU), so
the sharded path is tested on every machine (``configs/trainer/fsdp_cpu.yaml``, launched with
``torchrun --nproc_per_node 2 -m qoq.cli fit ...``).

The helpers are what the RL system needs to run under either strategy or none: :func:`root_call` (a
gradient pass as a forward of the sharded root), :func:`clip_grad_norm` (the global norm over shards),
:func:`full_parameters` (whole parameters for the rollout engine's weight sync), and :func:`rng_state` /
:func:`set_rng_state` (the RNG streams a checkpoint keeps for exact resume). docs/SCALING.md has the why.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

#: Encoder block classes wrapped as FSDP units in addition to the LM's decoder layers (by qualified name,
#: so nothing is imported until a model is wrapped).
ENCODER_BLOCKS: tuple[str, ...] = (
    "timm.models.vision_transformer.Block",
    "torch.nn.modules.transformer.TransformerEncoderLayer",
)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _import_class(path: str) -> type[nn.Module]:
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(
            f"layer class {path!r}: give the qualified name, e.g. 'timm.models.vision_transformer.Block'"
        )
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"layer class {path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"layer class {path!r} is not an nn.Module subclass")
    return cls


def layer_classes(model: nn.Module, extra: Sequence[str] = ()) -> set[type[nn.Module]]:
    """The module classes that become FSDP units (and activation-checkpointed blocks) of ``model``.

    Args:
        model: the module to shard (e.g. a ``PolicyOptimization`` with its policy built).
        extra: more classes, by qualified name.

    Returns:
        Classes present in ``model``: those named in any HF model's ``_no_split_modules`` (decoder layers,
        vision blocks), the encoder blocks of :data:`ENCODER_BLOCKS`, and ``extra``.

    Raises:
        ValueError: a name in ``extra`` cannot be imported, or ``model`` holds none of the classes.
        TypeError: a name in ``extra`` is not an ``nn.Module`` class.
    """
    no_split: set[str] = set()
    for module in model.modules():
        no_split.update(getattr(module, "_no_split_modules", None) or ())
    present = {type(m) for m in model.modules()}
    wanted = {c for c in present if c.__name__ in no_split}
    for path in (*ENCODER_BLOCKS, *extra):
        try:
            cls = _import_class(path)
        except ValueError:
            if path in extra:
                raise
            continue  # an optional encoder package is not installed
        wanted |= {c for c in present if issubclass(c, cls)}
    if not wanted:
        raise ValueError(
            f"no layer class to shard in {type(model).__name__}: it has no HF decoder layers or encoder blocks; "
            "name the classes with `layers`"
        )
    return wanted


class _BatchKeepingPrecision(FSDPPrecision):
    """FSDP precision that hands batches over unchanged.

    ``PromptBatch`` holds frozen dataclasses (reward targets) that Lightning's input conversion cannot
    rebuild, and nothing needs it: encoders cast their inputs to their own dtype.
    """

    def convert_input(self, data: Any) -> Any:
        return data


class PolicyFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP (FSDP1, ``use_orig_params``) with the units, precision and checkpointing of a policy.

    Every decoder layer of the LM and every encoder block becomes an FSDP unit (see :func:`layer_classes`);
    the rest (embeddings, norms, LM head, projector) lives in the root unit. Parameters are kept and
    optimised in fp32 (sharded); ``mixed_precision`` casts them for compute and reduces gradients in fp32.

    Args:
        layers: extra module classes (qualified names) to wrap, besides the ones found automatically.
        sharding_strategy: "FULL_SHARD" (ZeRO-3, the paper), "SHARD_GRAD_OP" (ZeRO-2) or "HYBRID_SHARD"
            (full shard inside a node, replicate across nodes). For no sharding use DDP.
        mixed_precision: compute dtype of the parameters ("bf16", "fp16"), with gradients reduced and
            buffers kept in fp32; None computes in the parameters' dtype. Keep ``trainer.precision: 32-true`` with it.
        activation_checkpointing: recompute each wrapped layer's activations in the backward pass.
        cpu_offload: keep the sharded parameters (and gradients) in CPU memory between uses.
        state_dict_type: "full" (one ``.ckpt`` file gathered on rank 0) or "sharded" (a folder of shards,
            written by every rank in parallel; for large models).
        limit_all_gathers: rate-limit the all-gathers (bounds memory with many units in flight).
        device_mesh: ``(replicas, shards)`` for HYBRID_SHARD, e.g. ``(num_nodes, gpus_per_node)``: shard
            within a node (fast links), replicate across nodes.
        **kwargs: further ``FSDPStrategy`` / ``FullyShardedDataParallel`` arguments.
    """

    def __init__(
        self,
        layers: Sequence[str] = (),
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD",
        mixed_precision: Literal["bf16", "fp16"] | None = None,
        activation_checkpointing: bool = False,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        limit_all_gathers: bool = True,
        device_mesh: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        if mixed_precision not in (None, *_DTYPES):
            raise ValueError(f"mixed_precision={mixed_precision!r}; use 'bf16', 'fp16' or None")
        if sharding_strategy == "HYBRID_SHARD" and device_mesh is None:
            raise ValueError("sharding_strategy=HYBRID_SHARD needs device_mesh: (num_nodes, gpus_per_node)")
        if device_mesh is not None:
            kwargs["device_mesh"] = tuple(device_mesh)
        mp = None
        if mixed_precision is not None:
            from torch.distributed.fsdp import MixedPrecision

            dtype = _DTYPES[mixed_precision]
            # buffers stay fp32: the LM's rotary tables are buffers the rollout engine rebuilds in fp32 from
            # the config; bf16 copies move the trainer's log-probs off the engine's (tests/rollout/test_sync_buffers.py)
            mp = MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        super().__init__(
            sharding_strategy=sharding_strategy,
            mixed_precision=mp,
            cpu_offload=cpu_offload,
            state_dict_type=state_dict_type,
            limit_all_gathers=limit_all_gathers,
            **kwargs,
        )
        self._extra_layers = tuple(layers)
        self._checkpoint_layers = activation_checkpointing

    @property
    def precision_plugin(self) -> FSDPPrecision:
        plugin = self._precision_plugin
        return plugin if plugin is not None else _BatchKeepingPrecision("32-true")

    @precision_plugin.setter
    def precision_plugin(self, plugin: Any) -> None:
        if type(plugin) is FSDPPrecision:
            plugin = _BatchKeepingPrecision(plugin.precision, plugin.scaler)
        FSDPStrategy.precision_plugin.fset(self, plugin)

    def _wrap_kwargs(self, model: nn.Module) -> None:
        """Decide the auto-wrap policy and the checkpointed classes from the model itself."""
        if self.world_size < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 processes: with one, FSDP falls back to NO_SHARD, "
                "whose hooks do not support the RL step's several backward passes; drop the strategy "
                "(trainer.strategy: auto) to train in one process"
            )
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        classes = layer_classes(model, self._extra_layers)
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self._checkpoint_layers:
            self._activation_checkpointing_kwargs = {"check_fn": lambda m: isinstance(m, tuple(classes))}

    def _setup_model(self, model: nn.Module) -> nn.Module:
        self._wrap_kwargs(model)
        return super()._setup_model(model)


class CPUFSDPStrategy(PolicyFSDPStrategy):
    """:class:`PolicyFSDPStrategy` on CPU processes (gloo): the sharded code path without a GPU.

    For tests and small runs: ``--trainer.accelerator cpu --trainer.devices 2 --trainer.strategy
    qoq.strategies.CPUFSDPStrategy``. Mixed precision and CPU offload are GPU features and are off.

    Args:
        layers: extra module classes (qualified names) to wrap.
        sharding_strategy: as for :class:`PolicyFSDPStrategy`.
        activation_checkpointing: recompute each wrapped layer's activations in the backward pass.
        state_dict_type: "full" or "sharded" checkpoints.
        **kwargs: further ``FSDPStrategy`` arguments.
    """

    def __init__(
        self,
        layers: Sequence[str] = (),
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP"] = "FULL_SHARD",
        activation_checkpointing: bool = False,
        state_dict_type: Literal["full", "sharded"] = "full",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(
            layers=layers,
            sharding_strategy=sharding_strategy,
            activation_checkpointing=activation_checkpointing,
            state_dict_type=state_dict_type,
            limit_all_gathers=False,
            **kwargs,
        )

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from lightning.fabric.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        self._wrap_kwargs(model)
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    # Lightning gathers full checkpoints with ``offload_to_cpu=True``; on CPU that returns views of the
    # freed unsharded parameters instead of copies (the save then segfaults), so gather without offload.
    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with _full_state_dict_context(self.model):
            return self.model.state_dict()

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with _full_state_dict_context(self.model):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:  # the standard (parameter-id keyed) layout, as Lightning saves it
                state = FullyShardedDataParallel.rekey_optim_state_dict(
                    state, OptimStateKeyType.PARAM_ID, self.model
                )
            return state


def _full_state_dict_context(model: nn.Module) -> Any:
    """Full (rank-0) model and optimizer state dicts, gathered without CPU offload."""
    from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.api import FullOptimStateDictConfig

    return FullyShardedDataParallel.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
        FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
    )


# ---------------------------------------------------------------------------------------------- helpers
def _fsdp1_root(model: nn.Module | None) -> nn.Module | None:
    """``model`` when it is an FSDP1 (``FullyShardedDataParallel``) root, else None."""
    if model is None:
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


@contextlib.contextmanager
def full_parameters(model: nn.Module | None) -> Iterator[None]:
    """Inside this block the parameters of ``model`` (the trainer's wrapped root) are whole on every rank.

    FSDP1: ``summon_full_params`` without write-back. On GPU the gathered parameters are offloaded to CPU
    memory unit by unit (``offload_to_cpu``), so GPU memory grows by one FSDP unit at a time, not by the
    model; the host then holds one full copy per rank. Tensors read inside the block are views that die
    with it: consume them inside (a rollout engine's weight push does). FSDP2 (DTensor parameters) and
    unsharded models need nothing (``Policy.lm_weights_for_sync`` gathers DTensors tensor by tensor).

    Args:
        model: ``trainer.model`` (None or an unwrapped module: no-op).
    """
    root = _fsdp1_root(model)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    offload = next((p.device.type == "cuda" for p in root.parameters()), False)
    with FullyShardedDataParallel.summon_full_params(root, writeback=False, offload_to_cpu=offload):
        yield


def clip_grad_norm(model: nn.Module | None, parameters: Iterable[Tensor], max_norm: float) -> Tensor:
    """Clip gradients to a global norm over all ranks' shards; returns the norm before clipping.

    FSDP1 needs its root's ``clip_grad_norm_`` (``torch.nn.utils.clip_grad_norm_`` would see local shards
    only and clip each rank differently); FSDP2 DTensor gradients reduce inside ``clip_grad_norm_``.

    Args:
        model: ``trainer.model`` (the wrapped root), or None.
        parameters: the trainable parameters (used when ``model`` is not an FSDP1 root).
        max_norm: the maximum global L2 norm.
    """
    root = _fsdp1_root(model)
    if root is not None:
        norm = root.clip_grad_norm_(max_norm)
    else:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def root_call(module: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """``getattr(module, method)(*args, **kwargs)``, run as a forward of the FSDP1 root that wraps ``module``.

    FSDP1 registers its backward hooks on the outputs of the root's forward and reshards the root's own
    parameters (embeddings, norms, projector) after each backward. A step with several backward passes
    (PPO mini- and micro-batches) therefore runs each gradient forward through the root, which gathers
    those parameters again and hooks the outputs; the ``training_step`` itself only reads them before the
    first backward. Without an FSDP1 root this is a plain call (DDP handles manual backward itself).

    Args:
        module: the LightningModule (its ``trainer.model`` is the wrapped root).
        method: the method's name.
        *args: its positional arguments.
        **kwargs: its keyword arguments.
    """
    trainer = getattr(module, "_trainer", None)
    root = _fsdp1_root(trainer.model if trainer is not None else None)
    if root is None or root is module:
        return getattr(module, method)(*args, **kwargs)
    return trainer.strategy._forward_redirection(root, module, method, *args, **kwargs)


def gather_groups(module: Any, group_ids: Tensor, values: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    """Every rank's ``[N]`` values, flattened rank by rank, with group ids offset by rank so that ranks'
    groups stay disjoint; a single process gets its own values back.

    Args:
        module: the LightningModule (its ``all_gather``; its trainer's world size).
        group_ids: ``[N]`` this rank's group ids.
        values: name -> ``[N]`` tensors to gather alike.
    """
    trainer = getattr(module, "_trainer", None)
    if trainer is None or trainer.world_size <= 1:
        return group_ids, values
    gathered = module.all_gather({"groups": group_ids, **values})
    groups = gathered.pop("groups")  # [W, N]
    offsets = torch.arange(groups.shape[0], device=groups.device)[:, None] * (int(groups.max()) + 1)
    return (groups + offsets).flatten(), {k: v.flatten() for k, v in gathered.items()}


def rng_state() -> dict[str, Tensor]:
    """The torch RNG states of this process (CPU and every CUDA device), as tensors (``weights_only``-safe).

    Data-parallel ranks are seeded alike and draw alike, so rank 0's state (the one a full checkpoint
    keeps) restores every rank.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # [devices, S]
    return state


def set_rng_state(state: dict[str, Tensor]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only where the device count matches)."""
    torch.set_rng_state(state["cpu"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(cuda))
