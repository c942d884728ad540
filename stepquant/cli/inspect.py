"""`stepquant inspect`: a bundle's per-timestep correction terms, printed and plotted. It reads the bundle with
the runtime alone (no torch, no diffusers), so it starts in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import load_bundle
from stepquant.cli.options import TrustKey
from stepquant.eval.plots import plot_corrections
from stepquant.runtime.bundle_backends import bundle_corrections


def inspect_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose correction terms to show.")],
    plot: Annotated[Optional[Path], typer.Option(help="PNG of the terms per step (default: BUNDLE-corrections.png).")] = None,
    trust_key: TrustKey = None,
) -> None:
    """Print the bundle's per-timestep correction terms and plot them."""
    terms = bundle_corrections(load_bundle(bundle, trust_key))
    if terms is None:
        print(f"{bundle}: exported without correction terms (--correction none)")
        return
    print(f"{bundle}: {terms.method} correction terms for {len(terms.timesteps)} timesteps")
    print(f"  {'timestep':>8}  {'gain':>8}  {'bias':>9}  {'noise std':>9}  {'resid var':>9}  {'input bias':>10}")
    for i, t in enumerate(terms.timesteps.tolist()):
        print(f"  {t:8d}  {float(terms.gain[i].mean()):8.4f}  {float(terms.bias[i].mean()):9.2e}  "
              f"{float(terms.noise_std[i]):9.2e}  {float(terms.residual_var[i]):9.2e}  {float(terms.input_bias[i].mean()):10.2e}")
    plot = plot or bundle.with_name(bundle.name + "-corrections.png")
    plot_corrections(terms, plot)
    print(f"wrote {plot}")
