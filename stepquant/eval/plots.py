"""Figures of an evaluation and of a bundle's correction terms (matplotlib, imported when a figure is drawn)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stepquant.runtime.corrections import Corrections

if TYPE_CHECKING:
    from stepquant.eval.evaluate import Evaluation


def plot_errors(evaluation: Evaluation, path, title: str = "") -> None:
    """Per-step against accumulated error, step by step (the AccuQuant figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(1, len(evaluation.step_error) + 1)
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, evaluation.step_error, marker="o", markersize=3, label="per-step error (network, FP input)")
    axis.plot(steps, evaluation.accumulated_error, marker="s", markersize=3, label="accumulated error (trajectory)")
    axis.set_xlabel("sampler step")
    axis.set_ylabel("RMS error (log scale)")
    axis.set_yscale("log")
    axis.set_title(title or f"{evaluation.samples} samples")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_corrections(corrections: Corrections, path) -> None:
    """Gain, bias, added noise and removed variance of each step's correction terms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = corrections.timesteps
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.2), dpi=110)
    axes[0].plot(steps, corrections.gain.mean(axis=1), marker="o", markersize=3)
    axes[0].set_title("gain (channel mean)")
    axes[1].plot(steps, corrections.bias.mean(axis=1), marker="o", markersize=3, label="estimate bias")
    axes[1].plot(steps, corrections.input_bias.mean(axis=1), marker="s", markersize=3, label="input bias")
    axes[1].set_title("bias (channel mean)")
    axes[1].legend()
    axes[2].plot(steps, corrections.noise_std, marker="o", markersize=3, label="added noise std")
    axes[2].plot(steps, corrections.residual_var, marker="s", markersize=3, label="removed variance")
    axes[2].set_title("variance terms")
    axes[2].legend()
    for axis in axes:
        axis.set_xlabel("timestep")
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
    figure.suptitle(f"{corrections.method} correction terms")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
