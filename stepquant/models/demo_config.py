"""Architectures and noise schedule of the bundled demo models, `demo-digits` (an unconditional DDPM of about
1M parameters) and `demo-digits-cond` (class-conditional, about 1.4M), both on 16x16 grey digits."""

UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
    "attention_head_dim": 32,
}

SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": True,
}

# `demo-digits-cond`: the same schedule without clipping the predicted x0 (as Stable Diffusion's schedulers):
# with clipping, guidance 3 overshoots (64% of guided samples read as the requested digit, 100% without;
# docs/reference/demo-models.md). A UNet2DConditionModel whose cross-attention reads a learned class
# table of CLASS_TOKENS tokens per class (ten digits and a null class for guidance).
CLASS_TOKENS = 4
CROSS_ATTENTION_DIM = 32
COND_UNET_CONFIG: dict = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64),
    "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": CROSS_ATTENTION_DIM,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
COND_SCHEDULER_CONFIG: dict = {**SCHEDULER_CONFIG, "clip_sample": False}
