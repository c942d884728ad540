"""demo-digits-sd's quantized UNet in diffusers' StableDiffusionPipeline, on the backend chosen."""

import os
import subprocess
import sys
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from stepquant.diffusers import from_bundle
from stepquant.models import load_model

out = Path(os.environ.get("OUT", "out/examples"))
out.mkdir(parents=True, exist_ok=True)
(out / "prompts.txt").write_text("a red seven on a blue background\nthe digit 3 in green, yellow paper\n")
export = [
    str(Path(sys.executable).with_name("export-quantized")),
    "--model",
    "demo-digits-sd",
    "--prompts-file",
    str(out / "prompts.txt"),
    "--out",
    str(out / "sd-drop-in"),
    "--overwrite",
    "--no-progress",
    *os.environ.get("FAST", "").split(),
]
subprocess.run(export, check=True)
pipe = StableDiffusionPipeline.from_pretrained(load_model("demo-digits-sd").pipeline, safety_checker=None)
pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
pipe.unet = from_bundle(out / "sd-drop-in", backend="onnxruntime")
with torch.no_grad():
    image = pipe(
        "a red seven on a blue background",
        num_inference_steps=4 if os.environ.get("FAST") else 25,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
image.save(out / "drop-in.png")
print(f"wrote {out / 'drop-in.png'} ({image.size[0]}x{image.size[1]})")
