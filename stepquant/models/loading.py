"""Resolve `--model` (the bundled demo name, a local diffusers directory, or a hub id) to a denoiser (UNet
or diffusion transformer) and its noise schedule, with one clear error for anything else."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from stepquant.models.denoisers import ARCHITECTURES
from stepquant.models.patch_embed import follow_input_shape_

DEMO_MODEL_NAME = "demo-digits"
CONDITIONAL_DEMO_NAME = "demo-digits-cond"
TEXT_TO_IMAGE_DEMO_NAME = "demo-digits-sd"  # a mini Stable Diffusion pipeline: tokenizer, text encoder, VAE, UNet
_BUNDLED = {
    DEMO_MODEL_NAME: Path(__file__).resolve().parent / "demo_digits",
    CONDITIONAL_DEMO_NAME: Path(__file__).resolve().parent / "demo_digits_cond",
    TEXT_TO_IMAGE_DEMO_NAME: Path(__file__).resolve().parent / "demo_digits_sd",
}
# a class-conditional pipeline's class table: a conditioning file whose row k is class k
CLASS_TABLE_FILE = "class_embeddings/class_embeddings.safetensors"


class ModelLoadError(ValueError):
    """The `--model` argument does not name a loadable diffusers model."""


@dataclass
class LoadedModel:
    """A denoiser in eval mode, the training scheduler's config, and where both came from (`pipeline`: the
    pipeline directory, whose text encoder turns prompts into conditioning; None for a bare model).
    `class_table`: a class-conditional pipeline's table (CLASS_TABLE_FILE), whose rows `--classes` picks.
    `latent`: its samples are latents for a VAE (text-conditioned models here), not pixels in [-1, 1]."""

    denoiser: torch.nn.Module
    scheduler_config: dict
    source: str
    pipeline: Path | None = None
    class_table: Path | None = None
    latent: bool = False


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot read {path}: {err}") from err


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(directory: Path) -> None:
    """Refuse a model folder whose weights are only in pickle files: unpickling a file can run code in it,
    and a model may come from anywhere. safetensors holds tensors and nothing else."""
    if any(directory.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES) if directory.is_dir() else []
    if pickled:
        raise ModelLoadError(
            f"{directory} holds its weights as pickle ({', '.join(pickled)}), which can run code when loaded; "
            "stepquant "
            "loads safetensors only. Convert them where you trust the file, e.g. "
            f"`.from_pretrained('{directory}').save_pretrained('{directory}', safe_serialization=True)` in diffusers"
        )
    raise ModelLoadError(f"{directory} has no weights (no .safetensors file)")


def _component_dirs(root: Path) -> tuple[Path, Path]:
    """(denoiser dir, scheduler config file) for a pipeline directory or a bare model directory."""
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        folder = next((f for f in ("unet", "transformer") if f in index), None)
        if folder is None:
            raise ModelLoadError(f"{root}/model_index.json names neither a unet nor a transformer component")
        return root / folder, root / "scheduler" / "scheduler_config.json"
    if (root / "config.json").is_file():
        sibling = root.parent / "scheduler" / "scheduler_config.json"
        return root, root / "scheduler_config.json" if (root / "scheduler_config.json").is_file() else sibling
    raise ModelLoadError(
        f"{root} is not a diffusers model directory: expected model_index.json (a pipeline) or config.json (a model)"
    )


def _check_schedule(config: dict, source: Path) -> None:
    """Refuse, before any work, a noise schedule the samplers cannot build (an unknown beta_schedule...)."""
    from stepquant.models.schedulers import make_scheduler
    from stepquant.runtime.sampler import SamplerConfig

    try:
        make_scheduler(SamplerConfig(steps=1), config)
    except ValueError as err:
        raise ModelLoadError(f"{source}: {err}") from err


def _load_local(root: Path) -> LoadedModel:
    model_dir, scheduler_file = _component_dirs(root)
    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{root} has no {model_dir.name}/config.json")
    class_name = _read_json(model_dir / "config.json").get("_class_name")
    if class_name not in ARCHITECTURES:
        raise ModelLoadError(
            f"{model_dir} holds a {class_name or 'model of unknown class'}; supported: {', '.join(ARCHITECTURES)}"
        )
    if not scheduler_file.is_file():
        raise ModelLoadError(f"{root} has no scheduler config (looked for {scheduler_file})")
    scheduler_config = _read_json(scheduler_file)
    _check_schedule(scheduler_config, scheduler_file)
    require_safetensors(model_dir)
    try:
        denoiser = ARCHITECTURES[class_name].cls.from_pretrained(
            model_dir, low_cpu_mem_usage=False, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelLoadError(f"cannot load the {class_name} weights in {model_dir}: {err}") from err
    follow_input_shape_(denoiser)
    pipeline = root if (root / "model_index.json").is_file() else None
    class_table = root / CLASS_TABLE_FILE if pipeline and (root / CLASS_TABLE_FILE).is_file() else None
    has_vae = pipeline is not None and "vae" in _read_json(root / "model_index.json")
    conditional = bool(ARCHITECTURES[class_name].conditions(dict(denoiser.config)))
    latent = has_vae or (conditional and class_table is None)
    return LoadedModel(
        denoiser.eval().requires_grad_(False), scheduler_config, str(root), pipeline, class_table, latent
    )


# configs, tokenizer vocabularies, and the FP32 safetensors weights of the denoiser and text encoders
_HUB_FILES = [
    "*.json",
    "*.txt",
    "*.model",
    "unet/diffusion_pytorch_model*.safetensors",
    "transformer/diffusion_pytorch_model*.safetensors",
    "text_encoder*/model*.safetensors",
]


def _load_hub(repo_id: str) -> LoadedModel:
    from huggingface_hub import snapshot_download

    try:
        root = Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as err:  # hub errors come in many classes; all mean "not available here"
        raise ModelLoadError(f"model '{repo_id}' is neither a local directory nor reachable on the hub: {err}") from err
    return _load_local(root)


def load_model(name_or_path: str) -> LoadedModel:
    """Load a bundled demo (`demo-digits`, `demo-digits-cond`, `demo-digits-sd`), a local diffusers directory
    (pipeline or model), or a hub id."""
    if name_or_path in _BUNDLED:
        loaded = _load_local(_BUNDLED[name_or_path])
        loaded.source = name_or_path
        return loaded
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{path} is a file; --model takes a diffusers model directory or one of {', '.join(_BUNDLED)}"
            )
        return _load_local(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/")):
        return _load_hub(name_or_path)
    raise ModelLoadError(f"model '{name_or_path}' not found: no such directory and not a bundled model name")
