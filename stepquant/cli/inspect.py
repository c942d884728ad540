"""`stepquant inspect`: a bundle's stored samplers, and one sampler's per-timestep correction terms, printed and
plotted. It reads the bundle with the runtime alone (no torch, no diffusers), so it starts in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from stepquant.bundle import load_bundle
from stepquant.cli.options import StoredSamplerOption, TrustKey, sampler_request
from stepquant.eval.plots import plot_corrections
from stepquant.runtime.bundle_backends import bundle_corrections, bundle_sampler


def inspect_command(
    bundle: Annotated[Path, typer.Option(help="Bundle whose correction terms to show.")],
    plot: Annotated[
        Optional[Path], typer.Option(help="PNG of the terms per step (default: BUNDLE-corrections.png).")
    ] = None,
    sampler: StoredSamplerOption = None,
    trust_key: TrustKey = None,
) -> None:
    """List the bundle's stored samplers; print one sampler's per-timestep correction terms (the default
    sampler's unless --sampler names another) and plot them."""
    loaded = load_bundle(bundle, trust_key)
    print(
        f"{bundle}: samplers {', '.join(e.sampler.spec for e in loaded.manifest.samplers)} (the first is the default)"
    )
    config = bundle_sampler(loaded, **sampler_request(sampler))
    terms = bundle_corrections(loaded, config)
    if terms is None:
        print(f"{bundle}: exported without correction terms (--correction none)")
        return
    print(f"{bundle}: {terms.method} correction terms of {config.spec} for {len(terms.timesteps)} timesteps")
    print(f"  {'timestep':>8}  {'gain':>8}  {'bias':>9}  {'noise std':>9}  {'resid var':>9}  {'input bias':>10}")
    for i, t in enumerate(terms.timesteps.tolist()):
        print(
            f"  {t:8d}  {float(terms.gain[i].mean()):8.4f}  {float(terms.bias[i].mean()):9.2e}  "
            f"{float(terms.noise_std[i]):9.2e}  {float(terms.residual_var[i]):9.2e}  "
            f"{float(terms.input_bias[i].mean()):10.2e}"
        )
    plot = plot or bundle.with_name(bundle.name + "-corrections.png")
    plot_corrections(terms, plot)
    print(f"wrote {plot}")
