"""Tests for the U-ViT, the residual (SiD2) U-ViT, the DDPM U-Net, layers and presets.

Most tests build parameters with NumPy from the abstract (eval_shape) variables instead of
calling `init`: on XLA:CPU compiling the per-parameter random initialisers costs more
than the whole forward pass, and random non-zero parameters are needed anyway because
the zero-initialised residual branches would hide conditioning and dropout. One test
runs the real `init`.
"""

import functools
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simple_diffusion import models
from simple_diffusion.models import layers
from simple_diffusion.models import presets

ALLOWED_AXES = {"embed", "mlp", "heads", "head_dim", "conv_in", "conv_out", "classes",
                "layers", None}
BATCH = 2


def _tiny(variant: str, **overrides):
    """The tiny preset turned into one of the architecture variants."""
    if variant == "unet":
        config = presets.get_preset("unet_tiny")
    else:
        config = presets.get_preset("tiny")
        if variant in ("dwt", "residual_dwt"):
            config.stem, config.dwt_levels = "dwt", 1
        if variant == "residual_dwt":
            config.residual = True
    config.update(overrides)
    return config


def _random_params(config, seed: int = 0, std: float = 1.0):
    """Random float32 params with the model's structure: N(0, std^2 / fan_in) kernels, N(0, std^2) else."""
    abstract = nn.unbox(presets.abstract_variables(config)["params"])
    rng = np.random.default_rng(seed)

    def sample(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) >= 2 else 1
        return jnp.asarray(rng.normal(0.0, std / np.sqrt(fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map(sample, abstract)


def _inputs(config, seed: int = 0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(BATCH, config.image_size, config.image_size, config.in_channels))
    logsnr = np.array([-3.0, 4.0])[:BATCH]
    labels = np.array([1, 7], np.int32)[:BATCH]
    return jnp.asarray(z, jnp.float32), jnp.asarray(logsnr, jnp.float32), jnp.asarray(labels)


@functools.lru_cache(maxsize=None)
def _apply_fn(variant: str, overrides: tuple = ()):
    """(config, jitted apply(params, z, logsnr, labels, train, dropout_key)), one compile each."""
    config = _tiny(variant, **dict(overrides))
    model = models.create_model(config)

    @functools.partial(jax.jit, static_argnums=4)
    def apply(params, z, logsnr, labels, train, key):
        return model.apply({"params": params}, z, logsnr, labels, train=train,
                           rngs={"dropout": key})

    return config, apply


VARIANTS = ["patch", "dwt", "residual_dwt", "unet"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_shape_dtype_and_determinism(variant):
    config, apply = _apply_fn(variant)
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    out1 = apply(params, z, logsnr, labels, False, jax.random.key(0))
    out2 = apply(params, z, logsnr, labels, False, jax.random.key(1))
    assert out1.shape == z.shape and out1.dtype == jnp.float32
    assert np.all(np.isfinite(out1))
    np.testing.assert_array_equal(out1, out2)  # dropout off: the key must not matter
    assert np.std(np.asarray(out1)) > 1e-3


@pytest.mark.parametrize("variant", VARIANTS)
def test_conditioning_changes_output(variant):
    config, apply = _apply_fn(variant)
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    key = jax.random.key(0)
    base = np.asarray(apply(params, z, logsnr, labels, False, key))
    null = jnp.full_like(labels, config.num_classes)  # the extra CFG null class
    other_logsnr = np.asarray(apply(params, z, logsnr + 2.0, labels, False, key))
    with_null = np.asarray(apply(params, z, logsnr, null, False, key))
    scale = np.std(base)
    assert np.max(np.abs(with_null - base)) > 1e-2 * scale
    assert np.max(np.abs(other_logsnr - base)) > 1e-2 * scale
    # Each example is processed independently (no cross-batch leakage).
    single = np.asarray(apply(params, z[:1].repeat(2, 0), logsnr[:1].repeat(2), labels[:1].repeat(2),
                              False, key))
    np.testing.assert_allclose(single[0], base[0], rtol=1e-4, atol=1e-5)


def test_labels_required_when_conditional():
    config = _tiny("patch")
    model = models.create_model(config)
    z, logsnr, _ = _inputs(config)
    with pytest.raises(ValueError, match="labels are required"):
        jax.eval_shape(lambda p: model.apply({"params": p}, z, logsnr, None),
                       nn.unbox(presets.abstract_variables(config)["params"]))


def test_unconditional_model_accepts_no_labels():
    config = _tiny("patch", num_classes=0)
    model = models.create_model(config)
    variables = presets.abstract_variables(config)
    assert "class_embedding" not in variables["params"]["conditioning"]
    z, logsnr, _ = _inputs(config)
    out = jax.eval_shape(lambda p: model.apply({"params": p}, z, logsnr, None),
                         nn.unbox(variables["params"]))
    assert out.shape == z.shape and out.dtype == jnp.float32


def test_real_init_starts_residual_branches_at_zero():
    # One block rather than the whole model: compiling the random initialisers of every
    # parameter dominates a tiny model's init on XLA:CPU.
    tokens = jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, 8)), jnp.float32)
    block = layers.TransformerBlock(num_heads=2, mlp_ratio=2.0)
    mod = jnp.zeros((1, 4, 8))
    variables = jax.jit(lambda r: block.init(r, tokens, mod))(jax.random.key(1))
    assert set(variables) == {"params"}
    params = nn.unbox(variables)["params"]
    np.testing.assert_array_equal(params["attention"]["out"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["mlp"]["out"]["kernel"], 0.0)
    assert np.std(np.asarray(params["attention"]["query"]["kernel"])) > 0.1
    np.testing.assert_allclose(block.apply(variables, tokens, mod)[0], tokens)
    _check_partition_specs(variables)


def _check_partition_specs(variables):
    specs = nn.get_partition_spec(variables)
    leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(variables))
    spec_leaves = jax.tree_util.tree_leaves(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(spec_leaves)
    for (path, leaf), spec in zip(leaves, spec_leaves):
        assert isinstance(spec, jax.sharding.PartitionSpec), path
        assert len(spec) == len(leaf.shape), (path, spec, leaf.shape)
        assert set(spec) <= ALLOWED_AXES, (path, spec)
        named = [a for a in spec if a is not None]
        assert len(named) == len(set(named)), (path, spec)  # no axis name used twice


@pytest.mark.parametrize("name", presets.preset_names())
def test_preset_params_specs_and_output_shape(name):
    """Param count within 10% of target, logical axes on every leaf, output shape: all abstract."""
    config = presets.get_preset(name)
    variables = presets.abstract_variables(config)
    count = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))
    target = presets.PARAM_TARGETS[name]
    assert abs(count - target) <= 0.1 * target, (name, count, target)
    _check_partition_specs(variables)
    if config.name == "uvit" and config.scan_layers:
        stacked = jax.tree_util.tree_leaves(nn.get_partition_spec(
            variables["params"]["transformer"]["blocks"]),
            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert all(spec[0] == "layers" for spec in stacked)
    model = models.create_model(config)
    size, ch = config.image_size, config.in_channels
    z = jax.ShapeDtypeStruct((1, size, size, ch), jnp.float32)
    scalar = jax.ShapeDtypeStruct((1,), jnp.float32)
    labels = jax.ShapeDtypeStruct((1,), jnp.int32)
    out = jax.eval_shape(lambda p, z, l, y: model.apply({"params": p}, z, l, y, train=True,
                                                        rngs={"dropout": jax.random.key(0)}),
                         nn.unbox(variables["params"]), z, scalar, labels)
    assert out.shape == (1, size, size, ch) and out.dtype == jnp.float32


def test_count_params_of_the_two_billion_preset():
    count = presets.count_params(presets.get_preset("imagenet512"))
    assert isinstance(count, int) and 1.8e9 <= count <= 2.2e9, count


def test_residual_variant_has_no_blockwise_skips():
    plain = presets.abstract_variables(_tiny("dwt"))["params"]
    residual = presets.abstract_variables(_tiny("residual_dwt"))["params"]
    ch = presets.get_preset("tiny").channels[0]
    # U-Net skips concatenate a down activation onto the up block input (2ch channels).
    assert plain["up16_block0"]["conv1"]["kernel"].value.shape[2] == 2 * ch
    assert residual["up16_block0"]["conv1"]["kernel"].value.shape[2] == ch
    assert "skip" in plain["up16_block0"] and "skip" not in residual["up16_block0"]


def _dropout_paths(config):
    model = models.create_model(config)
    z, logsnr, labels = _inputs(config)
    params = nn.unbox(presets.abstract_variables(config)["params"])
    _, state = jax.eval_shape(
        lambda p: model.apply({"params": p}, z, logsnr, labels, train=True,
                              rngs={"dropout": jax.random.key(0)},
                              capture_intermediates=lambda m, _: isinstance(m, nn.Dropout),
                              mutable=["intermediates"]), params)
    flat = jax.tree_util.tree_leaves_with_path(state.get("intermediates", {}))
    # Leaf paths are <module path>/__call__/<output index>; keep the module path.
    return {"/".join(str(k.key) for k in path[:-2]) for path, _ in flat}


def test_dropout_only_at_configured_resolutions():
    low = _dropout_paths(_tiny("patch", dropout=0.5, dropout_from_resolution=8))
    assert low and all(p.startswith("transformer/") for p in low)
    both = _dropout_paths(_tiny("patch", dropout=0.5, dropout_from_resolution=16))
    assert {"down16_block0/dropout", "up16_block0/dropout"} <= both and low < both
    assert not _dropout_paths(_tiny("patch", dropout=0.0, dropout_from_resolution=16))
    unet = _dropout_paths(_tiny("unet", dropout=0.5, dropout_from_resolution=16))
    assert unet and all("32" not in p for p in unet)


def test_dropout_is_active_in_training_only_at_low_resolution():
    config, apply = _apply_fn("patch", (("dropout", 0.5), ("dropout_from_resolution", 8)))
    model = models.create_model(config)
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    a = apply(params, z, logsnr, labels, True, jax.random.key(0))
    b = apply(params, z, logsnr, labels, True, jax.random.key(1))
    assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-3
    # The 16x16 down block sees no dropout: its activations do not depend on the key.
    @jax.jit
    def down_block(key):
        _, state = model.apply({"params": params}, z, logsnr, labels, train=True,
                               rngs={"dropout": key}, mutable=["intermediates"],
                               capture_intermediates=lambda m, _: m.name == "down16_block0")
        return state["intermediates"]["down16_block0"]["__call__"][0]
    keys = jax.random.split(jax.random.key(2))  # one compile, both keys
    acts = np.asarray(jax.vmap(down_block)(keys))
    np.testing.assert_array_equal(acts[0], acts[1])


def test_bfloat16_forward_close_to_float32():
    config, apply = _apply_fn("patch")
    config_bf16, apply_bf16 = _apply_fn("patch", (("dtype", "bfloat16"),))
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    ref = np.asarray(apply(params, z, logsnr, labels, False, jax.random.key(0)))
    out = apply_bf16(params, z, logsnr, labels, False, jax.random.key(0))
    assert out.dtype == jnp.float32
    rel = np.linalg.norm(np.asarray(out) - ref) / np.linalg.norm(ref)
    assert rel < 3e-2, rel


def test_scan_and_remat_match_the_unrolled_stack():
    config, apply = _apply_fn("patch")
    config_scan, apply_scan = _apply_fn("patch", (("scan_layers", True), ("remat", True)))
    params = _random_params(config)
    blocks = [params["transformer"].pop(f"block_{i}") for i in range(config.transformer_depth)]
    z, logsnr, labels = _inputs(config)
    ref = np.asarray(apply(params | {"transformer": {**params["transformer"],
                                                     **{f"block_{i}": b for i, b in
                                                        enumerate(blocks)}}},
                           z, logsnr, labels, False, jax.random.key(0)))
    scanned = dict(params)
    scanned["transformer"] = {"blocks": jax.tree_util.tree_map(lambda *x: jnp.stack(x), *blocks)}
    out = np.asarray(apply_scan(scanned, z, logsnr, labels, False, jax.random.key(0)))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_scanned_compile_time_is_flat_in_depth():
    def compile_seconds(depth):
        config = _tiny("patch", transformer_depth=depth, scan_layers=True)
        model = models.create_model(config)
        params = nn.unbox(presets.abstract_variables(config)["params"])
        z, logsnr, labels = _inputs(config)
        fn = jax.jit(lambda p, z, l, y: model.apply({"params": p}, z, l, y))
        start = time.perf_counter()
        fn.lower(params, z, logsnr, labels).compile()
        return time.perf_counter() - start

    t4, t36 = compile_seconds(4), compile_seconds(36)
    print(f"compile: 4 blocks {t4:.2f}s, 36 blocks {t36:.2f}s")
    assert t36 < 3.0 * t4, (t4, t36)  # unrolled would be ~9x


def _np_rms(x, scale):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale


def test_attention_matches_float64_numpy():
    rng = np.random.default_rng(0)
    b, t, d, heads = 2, 5, 8, 2
    hd = d // heads
    x = rng.normal(size=(b, t, d))
    p = {name: {"kernel": rng.normal(size=(d, heads, hd)) / np.sqrt(d),
                "bias": rng.normal(size=(heads, hd)) * 0.1} for name in ("query", "key", "value")}
    p["out"] = {"kernel": rng.normal(size=(heads, hd, d)), "bias": rng.normal(size=(d,))}
    p["query_norm"] = {"scale": rng.uniform(0.5, 2.0, size=(hd,))}
    p["key_norm"] = {"scale": rng.uniform(0.5, 2.0, size=(hd,))}
    module = layers.Attention(heads, qk_norm=True)
    params32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    got = np.asarray(jax.jit(module.apply)({"params": params32}, jnp.asarray(x, jnp.float32)))

    proj = {n: np.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")}
    q = _np_rms(proj["query"], p["query_norm"]["scale"])
    k = _np_rms(proj["key"], p["key_norm"]["scale"])
    logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attended = np.einsum("bnts,bsnh->btnh", w, proj["value"])
    want = np.einsum("btnh,nhd->btd", attended, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_sinusoidal_embedding_matches_numpy():
    x = np.array([-15.0, 0.0, 0.37, 150.0])
    got = np.asarray(layers.sinusoidal_embedding(jnp.asarray(x, jnp.float32), 8))
    freqs = 10_000.0 ** (-np.arange(4) / 4.0)
    want = np.concatenate([np.cos(x[:, None] * freqs), np.sin(x[:, None] * freqs)], axis=1)
    assert got.dtype == np.float32 and got.shape == (4, 8)
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("field,value,match", [
    ("name", "dit", "config.name"),
    ("image_size", 34, "config.image_size=34 is not divisible by the total downsampling 4"),
    ("stem", "pixel", "config.stem"),
    ("num_heads", 3, "config.transformer_width=32 must be divisible by config.num_heads=3"),
    ("num_res_blocks", (1, 1), "config.num_res_blocks"),
    ("dtype", "float16", "config.dtype"),
    ("dropout", 1.0, "config.dropout"),
])
def test_bad_uvit_config_raises(field, value, match):
    config = presets.get_preset("tiny")
    config[field] = value
    with pytest.raises(ValueError, match=match):
        models.create_model(config)


def test_bad_unet_and_missing_fields_raise():
    config = presets.get_preset("unet_tiny")
    config.attention_resolutions = (12,)
    with pytest.raises(ValueError, match="config.attention_resolutions contains 12"):
        models.create_model(config)
    config = presets.get_preset("tiny")
    del config["residual"]
    with pytest.raises(ValueError, match="residual"):
        models.create_model(config)
    with pytest.raises(ValueError, match="unknown model preset"):
        presets.get_preset("imagenet1024")
