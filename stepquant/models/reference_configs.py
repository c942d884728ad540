"""Architectures of public models, for speed measurements and conformance checks with random weights
(built from their configs, never downloaded)."""

# google/ddpm-cifar10-32's unet/config.json (35.7M parameters). Its "attention_head_dim" is null, so each
# attention layer has one head as wide as its channels (256), as in Ho et al.'s single-head attention;
# leaving the key out would give UNet2DModel's default of 8 (32 heads of dimension 8), a different model.
DDPM_CIFAR10_UNET: dict = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "attention_head_dim": None,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "norm_eps": 1e-6,
    "norm_num_groups": 32,
}
