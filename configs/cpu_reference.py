r"""This project's U-ViT at the shapes of lucidrains' PyTorch U-ViT, for the CPU comparison.

`benchmarks/torch_reference.py` times this config's train step beside
`denoising_diffusion_pytorch.simple_diffusion.UViT(dim=64, dim_mults=(1, 2, 4), vit_depth=6,
attn_heads=4, attn_dim_head=32)` trained by its `GaussianDiffusion` (v objective, Adam):

  python -m simple_diffusion.benchmark train --config=configs/cpu_reference.py:64

The argument is "<size>[,issue]":
  64    64x64x3, batch 8, patch 1 (a 1x1 conv).
  128   128x128x3, batch 4, patch 2.
  issue  conv levels with 64, 128, 256 channels, the mapping issue 13 first timed. The reference
        keeps `dim` channels at its first two levels (dims = [init_dim, dim, 2 dim, 4 dim]:
        64, 64, 128 conv channels, then a 256-wide transformer at 1/8 resolution), so the
        default here is channels (64, 64, 128), which matches its layout.
Both: two ResBlocks a level, transformer at 8x8 (64 px) or 8x8 (128 px, after the patch) of
width 256, depth 6, 4 heads, MLP ratio 4, l2 QK-norm with logit scale 8 (lucidrains'),
unconditional, v-MSE. Data is synthetic in the benchmark; training on it is not meaningful.
"""

from simple_diffusion import config_defaults
from simple_diffusion.models import presets

_SIZES = {"64": dict(image_size=64, patch_size=1, batch_size=8),
          "128": dict(image_size=128, patch_size=2, batch_size=4)}


def get_config(arg: str = "64"):
    parts = arg.split(",")
    if parts[0] not in _SIZES or parts[1:] not in ([], ["issue"]):
        raise ValueError(f"configs/cpu_reference.py:{arg}: use 64 or 128, optionally "
                         "followed by ',issue'.")
    size = _SIZES[parts[0]]
    channels = (64, 128, 256) if parts[1:] == ["issue"] else (64, 64, 128)
    c = config_defaults.base_config()
    c.model = presets.get_preset("tiny")
    c.model.update(dict(
        image_size=size["image_size"], in_channels=3, num_classes=0, stem="patch",
        patch_size=size["patch_size"], channels=channels, num_res_blocks=(2, 2, 2),
        transformer_width=256, transformer_depth=6, num_heads=4, mlp_ratio=4.0,
        qk_norm="l2", emb_dim=256))
    c.schedule.image_d = size["image_size"]
    c.loss.weighting = "v_mse"
    c.batch_size = size["batch_size"]
    c.ema_decays = (0.9999,)
    return c
