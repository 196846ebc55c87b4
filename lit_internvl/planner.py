"""Will it fit? The memory a recipe's training step needs on each GPU, found before anything is allocated.

The recipe is read as ``fit`` reads it (its layers composed, then the command line's ``--config`` presets): the stage
of its ``model:`` section builds its network on the meta device, with the freezing, LoRA, activation checkpointing,
sequence parallelism and FSDP2 sharding its strategy and precision ask for, over a *fake* world of ``--gpus``
processes (torch's fake process group: collectives do nothing). Its tensors then become ``FakeTensor``s (meta storage
posing as real devices: shapes and dtypes, no memory) and the planner runs the forward and backward of a worst-case
micro-batch — vision tower on the tiles, connector, decoder on the row, the chunked head and cross-entropy on every
position — under torch's memory tracker (``torch.distributed._tools``: ``MemTracker``, ``FSDPMemTracker``), which
follows every tensor's storage as it is created and freed. AdamW's state (two moments a trainable parameter, which the
first step creates) and step are added from the parameters' sizes. The prediction::

    peak per GPU = max(weights + optimiser state + activations + gradients + temporaries, at backward's worst moment;
                       weights + gradients + optimiser state + the multi-tensor step's temporary)

What stands in for what (each close in memory, not in numbers):

- the GPU is the CPU: bf16 autocast is CPU autocast, attention the CPU's SDPA kernels (the flash kernels of
  ``varlen``/``flex``, which keep no mask, are planned as causal SDPA without one; ``sdpa``/``eager`` on packed rows
  keep their dense ``T × T`` document mask, as they do on a GPU);
- every position is supervised (the chunked head keeps the most);
- experts are computed as if every expert got an equal share of the tokens (the routing of real data is not known);
- the fake world's rank 0 stands for every rank (FSDP2 shards evenly; a sequence-parallel rank holds ``T / sp`` of a
  row and ``tiles / sp`` of its tiles).

Sizes are linear in the row's tokens and tiles (apart from dense masks), so :func:`plan` plans a few shapes and reads
off the activations per token and per tile, extrapolates the longest packed row and the most tiles that fit (each
checked by one more step at that size, halving towards it where the check fails), and tries the sequence-parallel
sizes a row may need.
``benchmarks/planner_accuracy.py`` holds the predictions against peaks measured on the CPU.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from lit_internvl.components.moe import Experts
from lit_internvl.components.sequence_parallel import group_sum
from lit_internvl.losses import linear_cross_entropy
from lit_internvl.recipes import compose, merge

GiB = 2**30
#: Each card's memory as ``nvidia-smi`` reports its total (MiB).
GPUS: dict[str, int] = {"H100": 81_559 * 2**20, "H200": 143_771 * 2**20, "A100-80GB": 81_920 * 2**20}
GPU = Literal["H100", "H200", "A100-80GB"]
#: The share of a card's memory a plan may use: the CUDA context, NCCL's buffers and the caching allocator's
#: fragmentation take the rest.
USABLE = 0.9
Strategy = Literal["single", "ddp", "fsdp2"]


@dataclass
class Setup:
    """How a recipe trains, as far as memory goes (read by :func:`setup_of`).

    Attributes:
        devices: GPUs (processes) in all; sharded strategies shard over all of them.
        strategy: ``single`` (one device), ``ddp`` (replicas) or ``fsdp2`` (FSDP2Strategy, ModelParallelStrategy,
            SequenceParallelStrategy; FSDPStrategy is planned as FSDP2).
        sequence_parallel: ranks a row is split over (SequenceParallelStrategy's ``sequence_parallel_size``).
        precision: the trainer's (``32-true``, ``bf16-mixed``, ``bf16-true``...).
        rows, tokens, tiles: a micro-batch's worst case: rows of ``tokens`` tokens holding ``tiles`` tiles in all.
        packed: rows of several documents (a dense document mask for the ``sdpa``/``eager`` backends).
        activation_checkpointing, attn_backend, head_chunk_size: the stage's.
    """

    devices: int = 1
    strategy: Strategy = "single"
    sequence_parallel: int = 1
    precision: str = "32-true"
    rows: int = 1
    tokens: int = 1024
    tiles: int = 1
    packed: bool = False
    activation_checkpointing: bool = False
    attn_backend: str = "sdpa"
    head_chunk_size: int = 1024
    device: Literal["cuda", "cpu"] = "cuda"  # where it trains (AdamW's multi-tensor step on GPUs: its temporary)
    # The training losses' chunked head + cross-entropy, or logits at every supervised position then the
    # cross-entropy (validation, RL's log-probabilities, and the train-step benchmark of 2026-11-26).
    head: Literal["chunked", "logits"] = "chunked"
    notes: list[str] = field(default_factory=list)


@dataclass
class Step:
    """What one planned step keeps at its peak, per GPU (bytes), by kind (the tracker's categories): ``peak`` the
    larger of the forward/backward's peak (``backward``) and the optimiser step's."""

    peak: int
    kinds: dict[str, int]
    backward: int = 0
    activations: int = 0  # what the forward left for the backward (its saved tensors), per GPU


# -- reading a recipe ------------------------------------------------------------------------------------------------


def read_config(configs: list[str]) -> dict:
    """The merged config of ``--config`` files as ``fit`` reads them (each recipe's layers first)."""
    merged: dict = {}
    for path in configs:
        merged = merge(merged, compose(path))
    return merged


def setup_of(config: dict, devices: int | None = None) -> Setup:
    """The :class:`Setup` a merged recipe config describes; ``devices`` overrides ``trainer.devices × num_nodes``."""
    trainer, data = config.get("trainer") or {}, _with_defaults(config.get("data") or {})
    options = (config.get("model") or {}).get("init_args") or {}
    notes = []
    given = trainer.get("devices", 1)
    count = devices or (given if isinstance(given, int) else 1) * int(trainer.get("num_nodes", 1) or 1)
    strategy_config = trainer.get("strategy") or "auto"
    name = strategy_config.get("class_path", "") if isinstance(strategy_config, dict) else str(strategy_config)
    strategy_args = strategy_config.get("init_args") or {} if isinstance(strategy_config, dict) else {}
    sp = 1
    if name.endswith(("FSDP2Strategy", "ModelParallelStrategy", "SequenceParallelStrategy", "FSDPStrategy")):
        strategy = "fsdp2"
        if name.endswith("FSDPStrategy"):
            notes.append("FSDPStrategy is planned as FSDP2 (the same sharding of parameters, gradients and state)")
        if name.endswith("SequenceParallelStrategy"):
            sp = int(strategy_args.get("sequence_parallel_size", 2))
    elif count > 1:
        strategy = "ddp"
    else:
        strategy = "single"
    if count == 1 and strategy == "fsdp2":
        strategy = "single"  # nothing to shard over
    speed = options.get("speed") or {}
    tokens, rows, tiles, packed = _row_shape(data)
    return Setup(
        devices=count, strategy=strategy, sequence_parallel=sp, precision=str(trainer.get("precision", "32-true")),
        rows=rows, tokens=tokens, tiles=tiles, packed=packed,
        activation_checkpointing=bool(options.get("activation_checkpointing", False)),
        attn_backend=str(options.get("attn_backend") or "sdpa"), head_chunk_size=int(speed.get("head_chunk_size", 1024)),
        notes=notes,
    )  # fmt: skip


def _with_defaults(data: dict) -> dict:
    """The data section's ``init_args`` over its class's defaults (what ``fit`` would instantiate): a recipe that
    leaves ``max_tiles`` or ``batch_size`` to the datamodule is planned with the datamodule's values."""
    import inspect

    given = data.get("init_args") or {}
    module, _, name = str(data.get("class_path", "")).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return dict(given)
    defaults = {
        key: parameter.default
        for key, parameter in inspect.signature(cls.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **given}


def _row_shape(data: dict) -> tuple[int, int, int, bool]:
    """``(tokens a row, rows, tiles, packed)`` of the data's worst micro-batch: ``batch_size`` samples of
    ``max_length`` tokens, each with its ``max_tiles`` tiles (and a thumbnail), packed into rows of ``max_tokens``."""
    batch = int(data.get("batch_size", 1))
    packed = bool(data.get("pack", False))
    length = int(data.get("max_length") or data.get("max_tokens") or 1024)
    tiles = int(data.get("max_tiles", 1)) + (
        1 if data.get("use_thumbnail") and int(data.get("max_tiles", 1)) > 1 else 0
    )
    if not packed:
        return length, batch, batch * tiles, False
    row = int(data.get("max_tokens", length))
    total = batch * length
    rows = max(1, math.ceil(total / row))
    per_row = int(data.get("max_tiles_per_row", tiles * batch))
    return min(row, total), rows, min(batch * tiles, rows * per_row), True


def stage_factory(config: dict) -> Callable[[], nn.Module]:
    """A function building the stage of ``config``'s ``model:`` section, ``init_from`` dropped (the planner needs
    shapes, not weights) and ``<IMG_CONTEXT>``'s id a placeholder when no tokenizer is at hand."""
    from jsonargparse import ArgumentParser

    from lit_internvl.stages.base import Stage
    from lit_internvl.stages.vision_language import VisionLanguageStage

    model = dict(config["model"])
    model["init_args"] = {**(model.get("init_args") or {}), "init_from": None}
    module, _, name = model["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, VisionLanguageStage):
        raise ValueError(f"model.class_path {model['class_path']}: the planner plans vision-language stages")
    model["init_args"].setdefault("image_context_id", 0)
    model["init_args"]["activation_checkpointing"] = False  # set per plan (Setup)

    def build():
        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(Stage, "model")
        return parser.instantiate_classes(parser.parse_object({"model": model})).model

    return build


def tile_size_of(config: dict) -> int | None:
    return ((config.get("data") or {}).get("init_args") or {}).get("tile_size")


# -- one planned step ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_world(size: int):
    """A process group of ``size`` ranks in this one process (this one rank 0), whose collectives do nothing."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("The planner runs outside a distributed job (a process group is already initialised)")
    dist.init_process_group("fake", rank=0, world_size=size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def _mesh(setup: Setup):
    from torch.distributed.device_mesh import init_device_mesh

    if setup.strategy != "fsdp2":
        return None
    if setup.sequence_parallel > 1:
        shape = (setup.devices // setup.sequence_parallel, setup.sequence_parallel)
        return init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "sequence_parallel"))
    return init_device_mesh("cpu", (setup.devices, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))


def measure(build: Callable[[], nn.Module], setup: Setup, tile_size: int | None = None) -> Step:
    """The tracked peak of a training step of ``setup``'s micro-batch on the stage ``build()`` makes (its model built on
    the meta device, prepared and sharded by the stage's own ``configure_model``)."""
    _check(setup)
    with fake_world(setup.devices), _balanced_experts():
        stage = build()
        stage.hparams.activation_checkpointing = setup.activation_checkpointing
        stage._device_mesh = _mesh(setup)
        stage._trainer = SimpleNamespace(precision=setup.precision)  # what Stage.parallelize reads
        if tile_size is not None:
            stage._data = SimpleNamespace(tile_size=tile_size)
        with torch.device("meta"):
            stage.configure_model()
        return _fake_step(stage.model, setup)


def measure_model(make: Callable[[], nn.Module], setup: Setup) -> Step:
    """:func:`measure` for a bare :class:`~lit_internvl.models.VisionLanguageModel` that ``make()`` builds (on the meta
    device), every parameter trained, checkpointed and sharded as ``setup`` says (``benchmarks/train_step.py``)."""
    from lit_internvl.distributed import data_parallel_mesh, parallelize, sequence_parallel_group

    _check(setup)
    with fake_world(setup.devices), _balanced_experts():
        with torch.device("meta"):
            model = make()
        mesh = _mesh(setup)
        model.sequence_parallel = sequence_parallel_group(mesh)
        model.dummy_tile = setup.devices > 1
        bf16 = mesh is not None and setup.precision.startswith("bf16-mixed")
        parallelize(model, data_parallel_mesh(mesh), setup.activation_checkpointing, torch.bfloat16 if bf16 else None)
        return _fake_step(model, setup)


def _check(setup: Setup) -> None:
    if setup.devices % setup.sequence_parallel:
        raise ValueError(f"sequence_parallel {setup.sequence_parallel} does not divide {setup.devices} GPUs")


def _fake_step(model: nn.Module, setup: Setup) -> Step:
    """``model``'s tensors made fake, and one step tracked (:func:`_tracked_step`). The GPU-only attention backends
    (flash kernels that keep no mask) are planned as SDPA's causal kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lit_internvl.components.attention import set_attention_backend

    if setup.attn_backend not in ("sdpa", "eager"):
        set_attention_backend(model, "sdpa")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        return _tracked_step(model, setup)


@contextlib.contextmanager
def _balanced_experts():
    """Experts computed as if each got ``N·k / E`` of the N tokens' k choices (their memory, without routing data)."""

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        k = experts.shape[1]
        pairs = x.repeat_interleave(k, dim=0)  # (N·k, H), as the sorted copy of the real backends
        hidden = self._activation(F.linear(pairs, self.gate_up_proj[0]))
        out = F.linear(hidden, self.down_proj[0])
        return (out.view(-1, k, out.shape[-1]) * weights[..., None].to(out.dtype)).sum(dim=1)

    original = Experts.forward
    Experts.forward = forward
    try:
        yield
    finally:
        Experts.forward = original


def _tracked_step(model: nn.Module, setup: Setup) -> Step:
    """One forward and backward under the memory tracker; the optimiser's state (which the first step creates) and
    step are added from the parameters' sizes: AdamW keeps two moments a trainable parameter, in its dtype, and its
    multi-tensor step (torch's default on GPUs) one more copy of the second moments while it runs."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class FrozenSafe:
        # torch's trackers hook every parameter's gradient, which a frozen one (LoRA) refuses; the gradients are
        # allocated under the tracker all the same, and counted.
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            return super()._track_module_params_and_buffers(module, install_grad_hooks=False)

    sharded = setup.strategy == "fsdp2"
    tracker = (
        type("Sharded", (FrozenSafe, FSDPMemTracker), {})(model)
        if sharded
        else type("Tracker", (FrozenSafe, MemTracker), {})()
    )
    if not sharded:
        tracker.track_external(model)
    mixed = setup.precision.startswith(("bf16-mixed", "16-mixed"))
    # Through the model's own call, so that FSDP2 gathers the root's parameters (embeddings, head) around it.
    model.forward = functools.partial(_forward, model, setup)
    with tracker:
        before = _current(tracker)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mixed):
            loss = model()
        activations = _current(tracker) - before
        loss.backward()
    snapshot = next(iter(tracker.get_tracker_snapshot("peak").values()))
    kinds = {str(getattr(kind, "value", kind)): size for kind, size in snapshot.items() if kind != "Total"}
    local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in local)
    trainable = sum(p.numel() * p.element_size() for p, q in zip(local, model.parameters()) if q.requires_grad)
    state = 2 * trainable  # exp_avg and exp_avg_sq, in the parameters' dtype
    kinds["Optimizer state"] = state
    backward = snapshot["Total"] + state
    step = weights + trainable + state + (state // 2 if setup.device == "cuda" else 0)
    if setup.strategy == "ddp":  # DDP's gradient buckets: a second copy of the gradients, all step long
        kinds["DDP buckets"] = trainable
        backward, step = backward + trainable, step + trainable
    kinds["Optimizer step"] = step
    return Step(max(backward, step), kinds, backward, activations)


def _current(tracker) -> int:
    return next(iter(tracker.get_tracker_snapshot("current").values()))["Total"]


def _forward(model: nn.Module, setup: Setup) -> torch.Tensor:
    """A worst-case micro-batch through ``model`` (a VisionLanguageModel), as ``forward(..., head=CrossEntropy)``
    computes it, every position supervised; on a sequence-parallel rank its share of the tiles and of the row."""
    sp = model.sequence_parallel
    size = sp.size if sp is not None else 1
    decoder, rows = model.decoder, setup.rows
    width = -(-setup.tokens // size) * size
    local = width // size
    budget = model.tokens_per_tile()
    own_tiles = -(-setup.tiles // size) if setup.tiles else 0
    embeds = decoder.embed_tokens(torch.zeros(rows, local, dtype=torch.long))
    if own_tiles or model.dummy_tile:
        pixels = torch.zeros(max(own_tiles, 1), 3, model.tile_size, model.tile_size)
        features = model._connect(model.vision(pixels), budget).flatten(0, 1).to(embeds.dtype)
        if sp is not None:  # every tile's features on every rank
            total = setup.tiles * budget
            features = group_sum(F.pad(features, (0, 0, 0, max(total - features.shape[0], 0))), sp)
        slots = torch.zeros(rows, local, dtype=torch.bool)
        embeds = embeds.masked_scatter(slots[..., None], features) if own_tiles else embeds + 0 * features.sum()
    positions = torch.zeros(rows, local)
    documents = None
    if setup.packed and setup.attn_backend in ("sdpa", "eager"):  # a dense mask over the whole rows
        documents = torch.zeros(rows, width, dtype=torch.long)
    arguments = {"sequence_parallel": sp} if sp is not None else {}
    hidden = decoder(inputs_embeds=embeds, positions=positions, document_ids=documents, **arguments)
    targets = torch.zeros(rows * local, dtype=torch.long)
    supervised = hidden.flatten(0, 1).clone()  # hidden[supervised]: a copy of the positions the head reads
    if setup.head == "logits":
        return F.cross_entropy(decoder.head(supervised).float(), targets, reduction="sum")
    return linear_cross_entropy(supervised, decoder.head_weight, targets, setup.head_chunk_size).sum()


# -- the plan ---------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """A recipe's memory on its GPUs (every size in bytes, per GPU)."""

    setup: Setup
    gpu: str
    capacity: int
    parameters: dict[str, tuple[int, int]]  # part → (total, trainable)
    step: Step
    per_token: dict[bool, float]  # activation checkpointing → decoder activations a token
    per_tile: float
    longest: dict[int, int]  # sequence-parallel size → the longest row that fits
    most_tiles: int
    sp_needed: int | None

    @property
    def usable(self) -> int:
        return int(USABLE * self.capacity)

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.usable


def count_parameters(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``part → (parameters, trainable)`` by the first name component (vision, connector, decoder), then ``total``."""
    parts: dict[str, tuple[int, int]] = {}
    for name, param in model.named_parameters():
        part = name.split(".", 1)[0]
        total, trainable = parts.get(part, (0, 0))
        parts[part] = (total + param.numel(), trainable + (param.numel() if param.requires_grad else 0))
    return {**parts, "total": (sum(t for t, _ in parts.values()), sum(t for _, t in parts.values()))}


def parameters_of(build: Callable[[], nn.Module], tile_size: int | None = None) -> dict[str, tuple[int, int]]:
    """The parameter counts of the stage ``build()`` makes, its model on the meta device (after freezing and LoRA)."""
    with fake_world(1):
        stage = build()
        if tile_size is not None:
            stage._data = SimpleNamespace(tile_size=tile_size)
        with torch.device("meta"):
            stage.configure_model()
        return count_parameters(stage.model)


#: Rows are planned in multiples of this many tokens.
ROW_STEP = 256


def _largest(peak: Callable[[int], int], usable: int, unit: int, low: int, high: int, cap: int) -> int:
    """The largest multiple of ``unit`` up to ``cap`` whose planned ``peak`` fits in ``usable`` (0: not even ``unit``).
    Peaks grow linearly with tokens and tiles (a dense mask bends them upwards): the line through ``low`` and ``high``
    gives a guess that one more step checks; where it does not fit, the interval between what fits and what does
    not is halved down to 1/32 of it."""
    points = {x: peak(x) for x in (low, high)}
    good = max((x for x, y in points.items() if y <= usable), default=None)
    bad = min((x for x, y in points.items() if y > usable), default=None)
    if good is None:
        if peak(unit) > usable:
            return 0
        good = unit
    elif bad is None:
        slope = (points[high] - points[low]) / (high - low) if high != low else 0
        guess = cap if slope <= 0 else min(cap, int(high + (usable - points[high]) / slope)) // unit * unit
        if guess <= good or peak(guess) <= usable:
            return max(good, guess)
        bad = guess
    while bad - good > max(unit, good // 32):
        middle = (good + bad) // 2 // unit * unit
        if middle <= good:
            break
        if peak(middle) <= usable:
            good = middle
        else:
            bad = middle
    return good


def plan(
    config: dict, gpu: GPU = "H100", devices: int | None = None, tokens: int | None = None, search: bool = True
) -> Plan:
    """The plan of a merged recipe ``config`` on ``devices`` GPUs of kind ``gpu`` (default: the trainer's devices);
    ``tokens`` replaces the recipe's row length. Without ``search`` only the recipe's step and the activations a
    token and a tile are planned (the longest row, the most tiles and the sequence-parallel size need more steps)."""
    if gpu not in GPUS:
        raise ValueError(f"Unknown GPU {gpu!r}; choose one of {sorted(GPUS)}")
    setup = setup_of(config, devices)
    if tokens:
        setup = replace(setup, tokens=tokens)
    build, tile_size = stage_factory(config), tile_size_of(config)
    capacity = GPUS[gpu]
    usable = int(USABLE * capacity)
    steps: dict[tuple, Step] = {}

    def planned(**change) -> Step:
        changed = replace(setup, **change)
        key = (changed.tokens, changed.rows, changed.tiles, changed.sequence_parallel, changed.activation_checkpointing)
        if key not in steps:
            steps[key] = measure(build, changed, tile_size)
        return steps[key]

    def peak(**change) -> int:
        return planned(**change).peak

    step = planned()
    # Activations (what the forward leaves for the backward), per token and per tile a GPU holds (1/sp of the row's).
    # The slope between the row and one half as long, or twice as long when half would be shorter than ROW_STEP.
    sp = setup.sequence_parallel
    other = setup.tokens // 2 if setup.tokens // 2 >= ROW_STEP else 2 * setup.tokens
    own = lambda n: -(-n // sp)  # noqa: E731
    per_token = {}
    for checkpointing in (False, True):
        this, that = (
            planned(activation_checkpointing=checkpointing, tokens=t).activations for t in (setup.tokens, other)
        )
        per_token[checkpointing] = (this - that) / (own(setup.tokens) - own(other)) / setup.rows
    fewer = setup.tiles // 2
    per_tile = 0.0
    if own(setup.tiles) > own(fewer):
        per_tile = (step.activations - planned(tiles=fewer).activations) / (own(setup.tiles) - own(fewer))
    longest, most_tiles, sp_needed = {}, 0, None
    if search:
        # The longest row at the recipe's sequence parallelism, one row a micro-batch, the recipe's tiles.
        row = lambda t: peak(tokens=t, rows=1)  # noqa: E731
        low, high = (
            (max(setup.tokens // 2, ROW_STEP), setup.tokens) if setup.rows == 1 else (4 * ROW_STEP, 16 * ROW_STEP)
        )
        longest[setup.sequence_parallel] = _largest(row, usable, ROW_STEP, low, high, 1 << 21)
        # The most tiles one sample (a row of the recipe's length) holds: their tokens fit the row, their memory the GPU.
        room = setup.tokens // _tokens_per_tile(build, tile_size)
        per_sample = max(setup.tiles // setup.rows, 2)
        if room:
            most_tiles = _largest(lambda n: peak(tiles=n, rows=1), usable, 1, per_sample // 2, per_sample, room)
        sp_needed = _sequence_parallel_needed(peak, setup, usable)
    return Plan(setup, gpu, capacity, parameters_of(build, tile_size), step, per_token, per_tile, longest, most_tiles,
                sp_needed)  # fmt: skip


def _sequence_parallel_needed(peak: Callable[..., int], setup: Setup, usable: int) -> int | None:
    """The smallest sequence-parallel size (dividing the GPUs, up to 8) at which the recipe's rows fit; None if none
    does (or the strategy does not shard)."""
    for size in (1, 2, 4, 8):
        if setup.devices % size or (size > 1 and setup.strategy != "fsdp2"):
            continue
        try:
            if peak(sequence_parallel=size) <= usable:
                return size
        except ValueError as error:  # heads the group cannot split
            setup.notes.append(str(error))
    return None


def _tokens_per_tile(build, tile_size) -> int:
    with fake_world(1):
        stage = build()
        with torch.device("meta"):
            model = stage.build_model()
        return model.tokens_per_tile(tile_size)
