"""Denoising networks: the U-ViT (simple diffusion / SiD2) and the DDPM U-Net baseline.

`create_model(config)` is the one entry point; see `presets.py` for the configs and
`docs/models.md` for the architecture and preset choices.
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from simple_diffusion import config_validation
from simple_diffusion.models import unet
from simple_diffusion.models import uvit

_BUILDERS = {"uvit": uvit, "unet": unet}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_COMMON_FIELDS = ("name", "image_size", "in_channels", "num_classes", "dtype", "param_dtype")


def reject_unknown_fields(config: ml_collections.ConfigDict, fields) -> None:
    """ConfigError (a ValueError) naming a field of a model config not in `fields`.

    A config file can add any key, so a misspelt one (`c.model.num_head = 8`) would
    otherwise be read by nothing and the model built with the preset's value.
    """
    for key in config.keys():
        if key not in fields:
            raise config_validation.ConfigError(
                f"config.model.{key} is not a field of a {config.get('name')!r} model, so "
                f"nothing would read it.{config_validation.suggest(key, fields)} Its fields: "
                f"{sorted(fields)}.")


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
    """Builds the Flax Linen module described by `config`.

    Common fields: name ('uvit' | 'unet'), image_size, in_channels, num_classes (0 =
    unconditional; otherwise the model has num_classes + 1 class embeddings and index
    num_classes is the null class for classifier-free guidance), dtype ('float32' |
    'bfloat16', the compute dtype), param_dtype ('float32' | 'bfloat16'), plus the
    model-specific fields listed in `uvit.CONFIG_FIELDS` / `unet.CONFIG_FIELDS`.

    The module is called as `apply({'params': p}, z, logsnr, labels, train=..., rngs=...)`
    with z [B, H, W, C] float32, logsnr [B] float32, labels [B] int32 or None (only when
    num_classes == 0; labels are ignored then) and returns [B, H, W, C] float32.

    Raises:
      ValueError: for a missing, unknown or inconsistent field; the message names the
        field and the fix.
    """
    for field in _COMMON_FIELDS:
        if field not in config:
            raise ValueError(f"model config is missing field {field!r}; start from "
                             "presets.get_preset(...) and override.")
    if config.name not in _BUILDERS:
        raise ValueError(f"config.name={config.name!r}: use one of {sorted(_BUILDERS)}.")
    builder = _BUILDERS[config.name]
    # Fields added after a run started may be absent from its config.json; the
    # builder's OPTIONAL_FIELDS have defaults that reproduce the old model.
    optional = getattr(builder, "OPTIONAL_FIELDS", ())
    missing = [f for f in builder.CONFIG_FIELDS if f not in config and f not in optional]
    if missing:
        raise ValueError(f"{config.name} config is missing fields {missing}; start from "
                         "presets.get_preset(...) and override.")
    reject_unknown_fields(config, _COMMON_FIELDS + builder.CONFIG_FIELDS + optional)
    for field in ("dtype", "param_dtype"):
        if config[field] not in _DTYPES:
            raise ValueError(f"config.{field}={config[field]!r}: use one of {sorted(_DTYPES)}.")
    if config.image_size < 1 or config.in_channels < 1:
        raise ValueError("config.image_size and config.in_channels must be positive.")
    if config.num_classes < 0:
        raise ValueError(f"config.num_classes={config.num_classes}: use 0 for unconditional.")
    return builder.from_config(config, _DTYPES[config.dtype], _DTYPES[config.param_dtype])
