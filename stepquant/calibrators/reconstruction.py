"""Block-wise reconstruction (BRECQ / Q-Diffusion): for each block of the network, in execution order,
learn the weights' rounding (AdaRound) and the activation step sizes (LSQ) so that the quantized block,
fed by the already-reconstructed quantized network, reproduces the FP block's output on the
calibration set.

The trainer (`train_quantizers`) is shared with the trajectory objectives (multi-step, mixed-order):
they differ only in the loss they back-propagate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from stepquant.calibrators import distributed
from stepquant.calibrators.data import CalibrationSet
from stepquant.calibrators.shards import RowShards
from stepquant.models.device import module_placement
from stepquant.quant.grid import IntGrid
from stepquant.quant.layers import ActivationQuantizer, QuantizedLayer, SplitQuantizedLayer
from stepquant.quant.rounding import LearnedRounding

# Blocks reconstructed as one unit (diffusers class names); a quantized layer outside all of them is its own unit.
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "Downsample2D", "Upsample2D", "BasicTransformerBlock")


@dataclass(frozen=True)
class ReconstructionConfig:
    """Q-Diffusion's recipe (AdaRound weight 0.01, beta 20 -> 2 after 20% warm-up, L_2.4 output loss),
    with iteration counts cut for a CPU: 20k iterations per block there, a few hundred here."""

    iters: int = 300
    batch_size: int = 32
    rounding_lr: float = 1e-2
    # relative: each step size moves by about this fraction per iteration; 1e-2 drifted too far at 300
    # iterations (W4A8 33.9 dB against 40.6 dB at 3e-3, measured on the demo, tools/bench_calibrators.py)
    scale_lr: float = 3e-3
    rounding_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    p: float = 2.4
    seed: int = 0
    # the network-level stage of the trajectory calibrators (multistep, mixed-order), after the blocks
    trajectory_iters: int = 150
    trajectory_lr: float = 0.1  # the network-level stage fine-tunes: learning rates times this
    trajectory_batch: int = 16
    multistep_steps: int = 2  # n consecutive sampler steps per multi-step objective
    unrolled: bool = False  # back-propagate through the whole n-step chain (memory grows with n); tests only

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size", "trajectory_iters", "trajectory_batch", "multistep_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{_option(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("rounding_lr", "scale_lr", "trajectory_lr"):
            if not 0 < getattr(self, name) < float("inf"):
                raise ValueError(f"{_option(name)} must be a positive number, got {getattr(self, name)}")


def _option(field: str) -> str:
    """The command-line option of a ReconstructionConfig field (the others have none)."""
    return {"iters": "--recon-iters", "scale_lr": "--recon-scale-lr", "multistep_steps": "--multistep-steps"}.get(
        field, field.replace("_", "-")
    )


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the block of interest has run."""


def _quantizers(module: nn.Module) -> Iterator[ActivationQuantizer]:
    return (m for m in module.modules() if isinstance(m, ActivationQuantizer) and m.enabled)


def _layers(module: nn.Module) -> Iterator[QuantizedLayer]:
    return (m for m in module.modules() if isinstance(m, QuantizedLayer))


def reconstruction_units(model: nn.Module, data: CalibrationSet) -> list[str]:
    """Names of the blocks holding quantized layers, in the order the forward pass runs them."""
    candidates = {}
    for name, module in model.named_modules():
        is_block = type(module).__name__ in BLOCK_TYPES
        is_lone_layer = isinstance(module, (QuantizedLayer, SplitQuantizedLayer))
        if (is_block or is_lone_layer) and not any(name.startswith(f"{c}.") for c in candidates):
            if any(True for _ in _layers(module)):
                candidates[name] = module
    order: list[str] = []
    hooks = [
        m.register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n, m in candidates.items()
    ]
    try:
        with torch.no_grad():
            model(*next(data.batches(1)))
    finally:
        for hook in hooks:
            hook.remove()
    return order


class BlockRecords:
    """What a block receives (its positional and keyword arguments) or returns over the calibration set, or
    mixed-order's targets, for random batches to be drawn from: in memory, or, given a directory (the
    calibration set is on disk), one safetensors file per captured batch, read back a batch's rows at a time.
    Arguments that are not tensors are the same in every batch and kept once."""

    def __init__(self, directory: Path | None = None) -> None:
        self.shards = None if directory is None else RowShards(directory, prefix="block")
        self.batches: list[dict[str, torch.Tensor]] = []  # in memory: one dict per captured batch
        self.constants: dict[str, object] = {}
        self.layout: tuple[int, list[str]] | None = None  # positional count, keyword names (from the first batch)

    def append(self, args: tuple, kwargs: dict) -> None:
        named = {**{f"arg.{i}": a for i, a in enumerate(args)}, **{f"kwarg.{k}": v for k, v in kwargs.items()}}
        tensors = {name: value.detach().contiguous() for name, value in named.items() if torch.is_tensor(value)}
        if self.layout is None:
            self.layout = (len(args), list(kwargs))
            self.constants = {name: value for name, value in named.items() if not torch.is_tensor(value)}
        if self.shards is not None:
            self.shards.append(tensors)
        else:
            self.batches.append(tensors)

    def __len__(self) -> int:
        return (
            self.shards.rows_total
            if self.shards is not None
            else sum(len(next(iter(b.values()))) for b in self.batches)
        )

    def gather(self, index: torch.Tensor, device: torch.device) -> tuple[tuple, dict]:
        """The arguments at rows `index`, on `device`."""
        if self.shards is not None:
            rows = self.shards.rows(index)
        else:
            if len(self.batches) > 1:  # joined once, the batches let go
                self.batches = [{name: torch.cat([b[name] for b in self.batches]) for name in self.batches[0]}]
            rows = {name: value[index.to(value.device)] for name, value in self.batches[0].items()}
        values = {**self.constants, **{name: value.to(device) for name, value in rows.items()}}
        positional, keywords = self.layout
        return tuple(values[f"arg.{i}"] for i in range(positional)), {k: values[f"kwarg.{k}"] for k in keywords}

    def remove(self) -> None:
        if self.shards is not None:
            self.shards.remove()


def _capture(
    model: nn.Module, name: str, data: CalibrationSet, want_output: bool, records: BlockRecords, batch_size: int = 64
) -> BlockRecords:
    """Record what block `name` receives (args, kwargs) or returns, batch by batch over the calibration set."""
    block = model.get_submodule(name)

    def on_input(_module, args, kwargs):
        # contiguous (BlockRecords): attention outputs arrive with channels-last strides, whose GroupNorm
        # backward crashes torch 2.13's CPU kernel at some shapes
        records.append(args, kwargs)
        raise _Stop

    def on_output(_module, _args, output):
        if not torch.is_tensor(output):
            raise TypeError(f"block {name} returns {type(output).__name__}; reconstruction needs a tensor output")
        records.append((output,), {})
        raise _Stop

    hook = (
        block.register_forward_hook(on_output)
        if want_output
        else block.register_forward_pre_hook(on_input, with_kwargs=True)
    )
    try:
        with torch.no_grad():
            for inputs in data.batches(batch_size):
                try:
                    model(*inputs)
                except _Stop:
                    pass
    finally:
        hook.remove()
    return records


def train_quantizers(
    module: nn.Module,
    objective: Callable[[int], float],
    config: ReconstructionConfig,
    iters: int,
    beta_start: float,
    desc: str,
    progress: bool,
    lr_factor: float = 1.0,
    learn_rounding: bool = True,
) -> float:
    """Learn the rounding of every quantized weight in `module` and the step size of every enabled
    activation quantizer in it. `objective(iteration)` back-propagates the reconstruction loss itself
    (so it may free its graph step by step) and returns its value; the rounding regulariser, with beta
    annealed from `beta_start` to `config.beta_end` after the warm-up, is added here. Returns the last
    objective value. Roundings are left hard (alpha kept, for a later stage to resume)."""
    roundings: list[LearnedRounding] = [
        layer.weight_quantizer.learn_rounding(layer.layer.weight)
        for layer in _layers(module)
        if learn_rounding and isinstance(layer.weight_quantizer.grid, IntGrid)
    ]
    quantizers = list(_quantizers(module))
    groups = [{"params": [r.alpha for r in roundings], "lr": config.rounding_lr * lr_factor}] if roundings else []
    for quantizer in quantizers:
        quantizer.scale = quantizer.scale.detach().clone().requires_grad_(True)
        groups.append({"params": [quantizer.scale], "lr": config.scale_lr * lr_factor * quantizer.scale.item()})
    if not groups:
        return float("nan")
    optimiser = torch.optim.Adam(groups)
    warmup = int(config.warmup * iters)
    value = float("nan")
    try:
        for it in tqdm(range(iters), desc=desc, unit="it", disable=not progress, leave=False):
            optimiser.zero_grad(set_to_none=True)
            value = objective(it)
            if roundings and it >= warmup:
                progress_frac = (it - warmup) / max(1, iters - warmup)
                beta = config.beta_end + (beta_start - config.beta_end) * (1 - progress_frac)
                (config.rounding_weight * sum(r.regulariser(beta) for r in roundings)).backward()
            distributed.average_gradients(p for group in groups for p in group["params"])  # data-parallel ranks
            optimiser.step()
            with torch.no_grad():
                for quantizer in quantizers:
                    quantizer.scale.clamp_(min=1e-8)
    finally:
        for rounding in roundings:
            rounding.soft = False
        for quantizer in quantizers:
            quantizer.scale = quantizer.scale.detach()
    return value


def lp_loss(output: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's output loss: |difference|^p summed over channels, averaged over batch and positions."""
    return (output - target).abs().pow(p).sum(1).mean()


def reconstruct_blocks(
    fp_model: nn.Module,
    q_model: nn.Module,
    data: CalibrationSet,
    config: ReconstructionConfig = ReconstructionConfig(),
    progress: bool = True,
) -> dict[str, float]:
    """Reconstruct every block of `q_model` (activation ranges already calibrated) against `fp_model`;
    return the final loss per block. Inputs come from the quantized network ("asym"), so each block
    learns to undo the error of the blocks before it. When the calibration set is on disk, each block's
    inputs and targets are kept beside it (and removed after the block), so memory does not grow with it."""
    generator = torch.Generator().manual_seed(config.seed + distributed.rank())  # each rank its own batches
    losses: dict[str, float] = {}
    units = reconstruction_units(q_model, data)
    where = None if data.store is None else data.store.directory / "blocks"
    try:
        for name in tqdm(units, desc="reconstructing blocks", unit="block", disable=not progress, leave=False):
            losses[name] = _reconstruct_block(fp_model, q_model, name, data, config, generator, where, progress)
    finally:
        if where is not None and where.exists():
            where.rmdir()  # each block's records are gone already
    return losses


def _reconstruct_block(
    fp_model: nn.Module,
    q_model: nn.Module,
    name: str,
    data: CalibrationSet,
    config: ReconstructionConfig,
    generator: torch.Generator,
    where: Path | None,
    progress: bool,
) -> float:
    """Learn one block on its recorded inputs and FP outputs (in files under `where`, removed after)."""
    block = q_model.get_submodule(name)
    device, _ = module_placement(block)
    inputs = BlockRecords(None if where is None else where / "inputs")
    targets = BlockRecords(None if where is None else where / "targets")
    try:
        _capture(q_model, name, data, False, inputs)
        _capture(fp_model, name, data, True, targets)

        def objective(_it: int) -> float:
            index = torch.randint(len(targets), (config.batch_size,), generator=generator)
            args, kwargs = inputs.gather(index, device)
            (target,), _ = targets.gather(index, device)
            loss = lp_loss(block(*args, **kwargs), target, config.p)
            loss.backward()
            return loss.item()

        return train_quantizers(block, objective, config, config.iters, config.beta_start, name, progress)
    finally:
        inputs.remove()
        targets.remove()
