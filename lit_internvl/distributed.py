"""Scaling a stage's network: FSDP2 sharding per transformer block and activation checkpointing, in one place.

:func:`parallelize` is what :meth:`Stage.configure_model <lit_internvl.stages.base.Stage.configure_model>`
calls after the model is built, loaded and given its adapters::

    model ─► every block of every ``nn.ModuleList`` named ``layers`` ─┬─► checkpoint(block)      (activation_checkpointing)
             (vision.layers, decoder.layers, qllama.layers, …)        └─► fully_shard(block)     (a data-parallel mesh)
          ─► fully_shard(model)   the rest: embeddings, connector, norms, head, in one unit

Under Lightning's ``ModelParallelStrategy`` (:class:`FSDP2Strategy` puts every device on its data-parallel
dimension) the stage gets a device mesh and the blocks become FSDP2 units on its ``data_parallel``
dimension, on CPUs (gloo) as on GPUs (NCCL). Without a mesh (one device, DDP) only the checkpointing applies.
FSDP2 gathers a unit's parameters around its ``forward``; other entry points (``encode_text`` for zero-shot
classes, generation) run inside :func:`unsharded`.

A mixture-of-experts block (:class:`~lit_internvl.components.moe.SparseMoE`) is one unit like any other: its stacked
experts ``(E, …)`` are sharded along the experts' dimension with the rest of the block and gathered whole for the
block's forward (data parallelism over experts, not expert parallelism: every rank runs every expert on its own tokens).
When the gathered parameters are cast to a lower precision (``param_dtype``), each router (``mlp.gate``) is a unit of
its own gathered in float32, so that routing is computed from float32 weights.

The block lists are found by name, so every model of lit_internvl (VisionLanguageModel, DualEncoder,
InternVLG with QLLaMA) and a user's own encoder that keeps its blocks in ``layers`` are covered without a
list of classes; :data:`BLOCK_CLASSES` / :class:`BlockWrapPolicy` is that list for ``FSDPStrategy``.

Activation checkpointing is ``torch.distributed._composable.checkpoint``: a block keeps only its input
and recomputes its activations in the backward pass. Unlike ``checkpoint_wrapper`` it leaves module and
parameter names as they are, so checkpoints, LoRA targets and per-layer learning rates do not change.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn as nn
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lit_internvl.components.language import Block
from lit_internvl.components.moe import Router
from lit_internvl.components.sequence_parallel import SequenceParallel
from lit_internvl.components.vision import VisionBlock

BLOCK_LIST_NAME = "layers"


# The transformer blocks of lit_internvl's models, for FSDPStrategy's auto_wrap_policy and
# activation_checkpointing_policy (matched with isinstance: QLLaMABlock is a Block).
BLOCK_CLASSES: set[type[nn.Module]] = {VisionBlock, Block}


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for every element of every ``nn.ModuleList`` called ``layers`` in ``model``, outermost
    lists first; lists nested inside an already found block are left to that block."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not (isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == BLOCK_LIST_NAME):
            continue
        if any(name.startswith(f"{outer}.") for outer, _ in found):
            continue
        found += [(f"{name}.{index}", block) for index, block in enumerate(module)]
    return found


def compile_blocks(model: nn.Module, dynamic: bool | None = None, backend: str = "inductor") -> int:
    """Regional compilation: ``torch.compile`` every transformer block of ``model`` in place (the one block class is
    compiled once and reused for every layer of the same shapes, so compiling takes a block's time, not a model's);
    returns how many blocks. Called before checkpointing and sharding wrap the blocks, as torchtitan orders them.

    ``dynamic=None`` is torch's automatic dynamic shapes: a block is compiled for the first shapes it sees and once
    more with symbolic sizes when they change (tiles per batch, rows, lengths), so a run compiles a bounded number of
    graphs; padding the decoder's length to a multiple (``VisionLanguageModel(..., length_multiple=)``) keeps most
    batches on the static graph."""
    blocks = transformer_blocks(model)
    for _, block in blocks:
        block.compile(dynamic=dynamic, backend=backend)
    return len(blocks)


def parallelize(
    model: nn.Module,
    mesh=None,
    activation_checkpointing: bool = False,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = torch.float32,
) -> nn.Module:
    """Checkpoint and/or shard ``model`` in place (see the module docstring) and return it.

    Args:
        model: the built network (weights loaded, adapters added, trainability set: sharding freezes
            the module structure).
        mesh: a 1-D ``DeviceMesh`` to shard over (the ``data_parallel`` dimension of
            ``ModelParallelStrategy``'s mesh), or None for no sharding.
        activation_checkpointing: recompute each block's activations in the backward pass.
        param_dtype: FSDP2 casts the gathered parameters to this dtype for compute (``torch.bfloat16``
            under ``bf16-mixed``: half the all-gather traffic); None keeps their dtype.
        reduce_dtype: dtype of the gradient reduce-scatter (float32: exact sums across ranks).
    """
    blocks = transformer_blocks(model)
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        if not blocks:
            raise ValueError(f"activation_checkpointing: {type(model).__name__} has no nn.ModuleList named 'layers'")
        for _, block in blocks:
            checkpoint(block)
    if mesh is None:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Block inputs keep their dtype: the RoPE angles stay float32 (V2PE positions are fractional).
    policy = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype if param_dtype else None, cast_forward_inputs=False
    )
    # FSDP2 cannot shard 0-d parameters (the contrastive logit scale): they stay whole on every rank
    # and their gradients are averaged over the mesh as the sharded ones are.
    scalars = {param for param in model.parameters() if param.ndim == 0}
    for param in scalars:
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(_average_over(mesh))
    if param_dtype is not None and param_dtype != torch.float32:
        router_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for router in (module for module in model.modules() if isinstance(module, Router)):
            fully_shard(router, mesh=mesh, mp_policy=router_policy)
    for _, block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=scalars)
    return model


def _average_over(mesh):
    def hook(param: torch.Tensor) -> None:
        torch.distributed.all_reduce(param.grad, op=torch.distributed.ReduceOp.AVG, group=mesh.get_group())

    return hook


@contextmanager
def unsharded(model: nn.Module) -> Iterator[nn.Module]:
    """Gather the root's parameters of a sharded ``model`` for calls other than ``forward`` (FSDP2 gathers
    them around ``forward`` only; the blocks gather their own): ``with unsharded(model): model.encode_text(...)``.
    No-op when not sharded; nested, only the outermost gathers and reshards."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule) or getattr(model, "_lit_unsharded", False):
        yield model  # not sharded, or inside another `unsharded` of it: the outer one reshards
        return
    # FSDP2 picks its root at the first forward; a block must not run first and claim that role.
    model._get_fsdp_state()._lazy_init()
    model.unshard()
    model._lit_unsharded = True
    try:
        yield model
    finally:
        model._lit_unsharded = False
        model.reshard()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when none is initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def on_every_rank(flag: bool, model: nn.Module, device: torch.device | str = "cpu") -> bool:
    """``flag`` held on every rank, when ``model`` is sharded by FSDP2 over several processes; ``flag`` itself
    otherwise. A sharded model's blocks all-gather their parameters in every forward, so a loop of forwards whose end
    depends on the rank's own data (generation stopping when its rows are finished) must end on all ranks at once."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule) or world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
    return bool(value.item())


def updated_on_any_rank(metric) -> bool:
    """Whether the torchmetrics ``metric`` was updated on any rank. Its ``compute()`` gathers its state over the ranks,
    so when one rank updated it every rank must compute it (a rank whose validation shard held no such sample too),
    or the others wait in the gather."""
    if world()[1] == 1:
        return bool(metric.update_count)
    flag = torch.tensor([int(bool(metric.update_count))], device=metric.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def leave_process_group(code: int = 0) -> None:
    """End a rank of a finished multi-process run: barrier, destroy the process group, run the ``atexit`` handlers,
    flush, and leave with ``code`` without the interpreter's teardown.

    That teardown destroys whatever still holds gloo's or the TCP store's threads (a device mesh keeps its groups
    alive after ``destroy_process_group``) in no set order, and about one run in ten a running ``std::thread`` is
    destroyed: "terminate called without an active exception", SIGABRT, and torchrun or ``mp.spawn`` reports a
    failed rank after the run has finished and saved. Call it only when everything is written."""
    import atexit
    import logging
    import os
    import sys

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def data_parallel_rank(device_mesh) -> tuple[int, int]:
    """``(rank, size)`` of this process on the data-parallel dimension of ``device_mesh``: the ranks of a
    sequence-parallel group share one (they hold the same rows); without sequence parallelism :func:`world`."""
    if device_mesh is not None and SEQUENCE_PARALLEL in (device_mesh.mesh_dim_names or ()):
        data = device_mesh["data_parallel"]
        return data.get_local_rank(), data.size()
    return world()


def data_parallel_mesh(device_mesh):
    """The mesh :func:`parallelize` shards over, from the mesh ``ModelParallelStrategy`` gives a module (with
    sequence parallelism the data-parallel and sequence-parallel dimensions flattened into one: every rank holds a
    shard, and gradients are averaged over both); tensor parallelism is refused (lit_internvl's blocks have no
    tensor-parallel plan)."""
    if device_mesh is None:
        return None
    names = device_mesh.mesh_dim_names or ()
    if SEQUENCE_PARALLEL in names:
        return device_mesh["data_parallel", SEQUENCE_PARALLEL]._flatten("data_and_sequence_parallel")
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size {device_mesh['tensor_parallel'].size()}: lit_internvl shards with FSDP2 only; "
            "set ModelParallelStrategy(tensor_parallel_size=1, data_parallel_size=<devices>)"
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` with every device of every node on the data-parallel dimension
    (pure FSDP2, no tensor parallelism; its ``"auto"`` would put a node's devices on the tensor-parallel
    dimension). The stage shards itself in ``configure_model`` with :func:`parallelize`.

    Checkpoints (:mod:`lit_internvl.checkpoint_io`): a distributed checkpoint is written into a new folder beside its
    target (every rank's shards, then ``meta.pt``, then the ``COMPLETE`` marker) and swapped in, never rewritten in
    place, so that a kill at any moment leaves the old checkpoint or the new one whole; a folder without its marker
    is refused on resume, as is a checkpoint of another stage (checked before any shard is read). Every file is
    unpickled with ``weights_only=True``."""

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__("auto", 1, save_distributed_checkpoint, process_group_backend, timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
        from lightning.pytorch.strategies import Strategy

        from lit_internvl import checkpoint_io

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported")
        if not self._save_distributed_checkpoint:  # one file on rank 0, written beside the target and renamed
            return Strategy.save_checkpoint(self, checkpoint, filepath)
        target = Path(self.broadcast(str(filepath)))
        partial = target.parent / self.broadcast(f"{checkpoint_io.PARTIAL}{checkpoint_io._token()}")
        if self.is_global_zero:
            partial.mkdir(parents=True)
        self.barrier("FSDP2Strategy.save_checkpoint: folder")
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        try:  # every rank's shards; a failure on one rank fails the collective save on all
            _distributed_checkpoint_save(state, partial)
        except Exception as error:  # noqa: BLE001 - any failure: the partial folder goes, the old checkpoint stays
            self._give_up(partial, target, error)
        failure = None
        if self.is_global_zero:
            try:
                checkpoint_io.write_file(partial / checkpoint_io.METADATA, lambda f: torch.save(checkpoint, f))
                checkpoint_io.mark_complete(partial, target, checkpoint.get("global_step"))
                checkpoint_io.swap_in(partial, target)
                checkpoint_io.tidy(target.parent)
            except Exception as error:  # noqa: BLE001 - said to every rank below
                failure = f"{type(error).__name__}: {error}"
        failure = self.broadcast(failure)
        if failure is not None:
            self._give_up(partial, target, failure)

    def _give_up(self, partial: Path, target: Path, error) -> None:
        from lit_internvl import checkpoint_io

        if self.is_global_zero:
            checkpoint_io._remove(partial)
        kept = "the previous checkpoint there is unchanged" if target.exists() else "nothing was written"
        raise checkpoint_io.CheckpointError(f"saving {target} failed ({error}); {kept}")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        from lit_internvl import checkpoint_io

        if weights_only is False:
            raise checkpoint_io.CheckpointError(
                f"{checkpoint_path}: weights_only=False was asked for; lit_internvl reads checkpoints with "
                "weights_only=True only"
            )
        path = Path(self.broadcast(str(checkpoint_path)))
        if checkpoint_io.is_url(path):
            raise checkpoint_io.CheckpointError(f"{checkpoint_path}: FSDP2 resumes from local checkpoints; download it")
        problem = checkpoint_io.incomplete(path)
        if problem is not None:
            raise checkpoint_io.CheckpointError(f"{path} cannot be resumed from: {problem}")
        # Before any shard is read into the model: a checkpoint of another stage fails here, naming both.
        checkpoint_io.check_stage(self.lightning_module, checkpoint_io.read_checkpoint(path, mmap=True), path)
        return super().load_checkpoint(path, weights_only=True)


SEQUENCE_PARALLEL = "sequence_parallel"


def sequence_parallel_group(device_mesh) -> SequenceParallel | None:
    """The sequence-parallel group of the mesh :class:`SequenceParallelStrategy` gives a module, or None."""
    if device_mesh is None or SEQUENCE_PARALLEL not in (device_mesh.mesh_dim_names or ()):
        return None
    if device_mesh[SEQUENCE_PARALLEL].size() == 1:
        return None
    return SequenceParallel(device_mesh[SEQUENCE_PARALLEL].get_group())


class SequenceParallelStrategy(FSDP2Strategy):
    """FSDP2 with every row split over ``sequence_parallel_size`` devices (Ulysses:
    :mod:`lit_internvl.components.sequence_parallel`): a ``(data_parallel, sequence_parallel)`` device mesh whose
    sequence-parallel groups are consecutive ranks (inside a node), the data-parallel size the world size over
    ``sequence_parallel_size``. The ranks of a group get the same batches (Lightning's sampler splits the data over the
    ``data_parallel`` dimension only); FSDP2 shards over both dimensions flattened (:func:`data_parallel_mesh`); the
    stage splits the model's rows over the group (:func:`sequence_parallel_group`)."""

    def __init__(
        self,
        sequence_parallel_size: int = 2,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if sequence_parallel_size < 1:
            raise ValueError(f"sequence_parallel_size must be at least 1, got {sequence_parallel_size}")
        super().__init__(save_distributed_checkpoint, process_group_backend, timeout)
        self.sequence_parallel_size = sequence_parallel_size

    def setup_environment(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        super(ModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        world_size, size = self.num_nodes * self.num_processes, self.sequence_parallel_size
        if world_size % size:
            raise ValueError(
                f"trainer.strategy.init_args.sequence_parallel_size {size} does not divide the {world_size} devices "
                "(trainer.devices × trainer.num_nodes)"
            )
        self._data_parallel_size, self._tensor_parallel_size = world_size // size, 1
        self._device_mesh = init_device_mesh(
            self.root_device.type, (world_size // size, size), mesh_dim_names=("data_parallel", SEQUENCE_PARALLEL)
        )
        self.lightning_module._device_mesh = self._device_mesh


class BlockWrapPolicy(ModuleWrapPolicy):
    """``FSDPStrategy``'s wrap and activation-checkpointing policy: one unit per block of :data:`BLOCK_CLASSES`."""

    def __init__(self) -> None:
        super().__init__(BLOCK_CLASSES)
