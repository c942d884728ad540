"""Train the bundled `demo-digits-sd`, a mini Stable Diffusion: scikit-learn's digits drawn in colour on
coloured backgrounds (32x32 RGB) with prompts that name them ("a red seven on a blue background", "the digit
7 in red, blue paper", ...). It is made of diffusers' and transformers' own classes, saved with
`StableDiffusionPipeline.save_pretrained` so that `StableDiffusionPipeline.from_pretrained(DIR)` loads it:

1. a CLIPTokenizer whose byte-level BPE merges are learned here from the prompts;
2. an AutoencoderKL, 3x32x32 images <-> 4x8x8 latents, its scaling_factor set from the latents' spread
   (1 / std, as Stable Diffusion's was);
3. a CLIPTextModel taught first what the prompts say (heads on its end-of-text state predict the digit and
   both colours), then frozen, as Stable Diffusion's UNet was trained on an already-trained CLIP text encoder:
   trained jointly from scratch, the UNet learned the colours but read the digit 35% of the time at best;
4. a UNet2DConditionModel trained on the latents (epsilon prediction) with the prompt dropped to "" one time
   in ten, so one model gives both halves of classifier-free guidance;
5. Stable Diffusion's DDIM scheduler config.

Deterministic (fixed seeds, deterministic algorithms, 2 threads). Ends by sampling guided FP images through
diffusers' pipeline and printing how often the digit classifier reads the requested digit and how often the
requested colours are the ones drawn.

    python tools/train_demo_sd.py [--vae-iters 800] [--text-iters 400] [--iters 4500]
        [--out stepquant/models/demo_digits_sd] [--final-check N] [--smoke]
    python tools/train_demo_sd.py --check 200        (the shipped model's accuracies)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from benchdoc import parse_options, scratch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm import tqdm
from train_demo import cosine_schedule, optimise
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from stepquant.data.coloured_digits import COLOURS, TEMPLATES, colour_pairs, load_coloured_digits, prompt, render
from stepquant.eval.text_to_image import coloured_digit_prompts, judge_coloured_digits
from stepquant.models.clip_tokenizer import save_clip_tokenizer
from stepquant.models.tiny import SD_SCHEDULER

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stepquant" / "models" / "demo_digits_sd"
MAX_LENGTH = 20
PROMPT_DROPOUT = 0.1
GUIDANCE = 5.0
VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(16, 32, 32),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(48, 96),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,
    norm_num_groups=16,
)
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
)


def corpus() -> list[str]:
    return [prompt(*asked) for asked in _asked()]


def _asked() -> list[tuple[int, int, int, int]]:
    """Every (digit, foreground, background, wording) the prompts can ask for."""
    return [(d, f, b, t) for d in range(10) for f, b in colour_pairs() for t in range(len(TEMPLATES))]


def batch(grey, labels, pairs, size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Random digits in random colour pairs and wordings: (images, prompts, [digit, fg, bg] per image)."""
    index = torch.randint(0, len(grey), (size,), generator=gen)
    colours = pairs[torch.randint(0, len(pairs), (size,), generator=gen)]
    templates = torch.randint(0, len(TEMPLATES), (size,), generator=gen)
    images = render(grey[index], colours[:, 0], colours[:, 1])
    texts = [prompt(int(labels[i]), int(c[0]), int(c[1]), int(t)) for i, c, t in zip(index, colours, templates)]
    return images, texts, torch.stack([labels[index], colours[:, 0], colours[:, 1]], 1)


def train_vae(data, iters: int, batch_size: int, gen: torch.Generator, kl_weight: float = 1e-4) -> AutoencoderKL:
    vae = AutoencoderKL(**VAE)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, iters)
    progress = tqdm(range(iters), desc="train the VAE", unit="it")
    for _ in progress:
        images, _, _ = batch(*data, batch_size, gen)
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=gen)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, images) + kl_weight * posterior.kl().mean()
        optimise(loss, optimizer, schedule, list(vae.parameters()), None, 0.0, progress)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images, _, _ = batch(*data, 1024, gen)
        spread = vae.encode(images).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / spread)
    return vae


def text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TEXT,
        )
    )


def pretrain_text_encoder(
    encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    iters: int,
    gen: torch.Generator,
    batch_size: int = 256,
    lr: float = 2e-3,
) -> float:
    """Teach `encoder` the prompts' content (linear heads on its end-of-text state predict the digit and both
    colours, cross-entropy), then freeze it; returns the heads' accuracy on every prompt (all three right)."""
    asked = torch.tensor(_asked())
    ids = tokenizer(
        corpus(), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    width = TEXT["hidden_size"]
    heads = torch.nn.ModuleList(
        [torch.nn.Linear(width, 10), torch.nn.Linear(width, len(COLOURS)), torch.nn.Linear(width, len(COLOURS))]
    )
    parameters = [*encoder.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, iters)
    progress = tqdm(range(iters), desc="teach the text encoder the prompts", unit="it")
    for _ in progress:
        rows = torch.randint(0, len(ids), (batch_size,), generator=gen)
        pooled = encoder(ids[rows]).pooler_output
        loss = sum(torch.nn.functional.cross_entropy(head(pooled), asked[rows, k]) for k, head in enumerate(heads))
        optimise(loss, optimizer, schedule, parameters, None, 0.0, progress)
    encoder.eval().requires_grad_(False)
    with torch.no_grad():
        pooled = encoder(ids).pooler_output
        right = torch.stack([head(pooled).argmax(1) == asked[:, k] for k, head in enumerate(heads)]).all(0)
    return right.float().mean().item()


def train_denoiser(
    data,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    encoder: CLIPTextModel,
    iters: int,
    batch_size: int,
    gen: torch.Generator,
    lr: float,
    ema_decay: float,
) -> UNet2DConditionModel:
    """The UNet on the frozen `encoder`'s states, with EMA weights."""
    unet = UNet2DConditionModel(**UNET)
    parameters = list(unet.parameters())
    ema = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, iters)
    noise_schedule = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER.items() if k != "set_alpha_to_one"})
    progress = tqdm(range(iters), desc="train the UNet", unit="it")
    for _ in progress:
        images, texts, _ = batch(*data, batch_size, gen)
        texts = [
            "" if drop else text for text, drop in zip(texts, torch.rand(batch_size, generator=gen) < PROMPT_DROPOUT)
        ]
        ids = tokenizer(
            texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
            states = encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch_size,), generator=gen)
        prediction = unet(noise_schedule.add_noise(latents, noise, t), t, encoder_hidden_states=states).sample
        optimise(
            torch.nn.functional.mse_loss(prediction, noise), optimizer, schedule, parameters, ema, ema_decay, progress
        )
    with torch.no_grad():
        for p, p_ema in zip(parameters, ema):
            p.copy_(p_ema)
    return unet.eval()


def accuracies(
    pipe: StableDiffusionPipeline, count: int, guidance: float = GUIDANCE, steps: int = 25
) -> tuple[float, float]:
    """(digit accuracy, colour accuracy) of guided FP images through diffusers' pipeline, for the project's
    prompt set (eval.text_to_image: prompt i asks for digit i mod 10, colour pair i mod 30, wording i mod 5;
    seed i)."""
    asked = coloured_digit_prompts(count)
    generator = [torch.Generator().manual_seed(i) for i in range(count)]
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in range(0, count, 50):
        with torch.no_grad():
            out = pipe(
                [prompt(*a) for a in asked[start : start + 50]],
                num_inference_steps=steps,
                guidance_scale=guidance,
                generator=generator[start : start + 50],
                output_type="pt",
            ).images
        images.append(out * 2 - 1)
    digit, colour, _ = judge_coloured_digits(torch.cat(images), asked)
    return digit, colour


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-iters", type=int, default=800)
    parser.add_argument("--text-iters", type=int, default=400)
    parser.add_argument("--iters", type=int, default=4500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", type=int, help="only measure the saved model's accuracies on this many prompts")
    parser.add_argument(
        "--final-check", type=int, default=200, help="prompts of the accuracies measured after training"
    )
    args = parse_options(parser, vae_iters=2, text_iters=2, iters=2, out=scratch, final_check=2)
    torch.set_num_threads(2)
    if args.check:
        pipe = StableDiffusionPipeline.from_pretrained(args.out, safety_checker=None)
        digit, colour = accuracies(pipe, args.check)
        print(
            f"guided FP images (guidance {GUIDANCE:g}, 25 DDIM steps, {args.check} prompts): digit {digit:.1%}, "
            f"colours {colour:.1%}"
        )
        return
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)
    data = load_coloured_digits()
    tokenizer = CLIPTokenizer.from_pretrained(save_clip_tokenizer(args.out / "tokenizer", corpus(), 150, MAX_LENGTH))
    vae = train_vae(data, args.vae_iters, args.batch_size, gen)
    encoder = text_encoder(tokenizer)
    understood = pretrain_text_encoder(encoder, tokenizer, args.text_iters, gen)
    print(f"text encoder: digit and both colours read right from {understood:.1%} of the prompts")
    unet = train_denoiser(data, vae, tokenizer, encoder, args.iters, args.batch_size, gen, args.lr, args.ema_decay)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out)
    sizes = {
        name: sum(p.numel() for p in part.parameters())
        for name, part in (("unet", unet), ("text encoder", encoder), ("vae", vae))
    }
    print(
        f"saved {args.out} ({', '.join(f'{k} {v:,}' for k, v in sizes.items())} parameters; latent scaling factor "
        f"{vae.config.scaling_factor:.4f}) in {time.perf_counter() - start:.0f} s"
    )
    digit, colour = accuracies(pipe, args.final_check)
    print(
        f"guided FP images (guidance {GUIDANCE:g}, 25 DDIM steps, {args.final_check} prompts): digit {digit:.1%}, "
        f"colours {colour:.1%}"
    )


if __name__ == "__main__":
    main()
