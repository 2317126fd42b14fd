"""Tests for the U-ViT, the residual (SiD2) U-ViT, the DDPM U-Net, layers and presets.

Most tests build parameters with NumPy from the abstract (eval_shape) variables instead of
calling `init`: on XLA:CPU compiling the per-parameter random initialisers costs more
than the whole forward pass, and random non-zero parameters are needed anyway because
the zero-initialised residual branches would hide conditioning and dropout. One test
runs the real `init`.
"""

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import eval_without_process_flags  # pylint: disable=g-bad-import-order
from simple_diffusion import models
from simple_diffusion.models import layers
from simple_diffusion.models import presets
from simple_diffusion.models import uvit

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
        if variant == "per_block_l2":
            config.modulation, config.qk_norm = "per_block", "l2"
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


VARIANTS = ["patch", "dwt", "residual_dwt", "per_block_l2", "unet"]


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


@pytest.mark.parametrize("modulation", ["shared", "per_block"])
def test_real_init_starts_residual_branches_at_zero(modulation):
    # One block rather than the whole model: compiling the random initialisers of every
    # parameter dominates a tiny model's init on XLA:CPU.
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.normal(size=(1, 4, 8)), jnp.float32)
    block = layers.TransformerBlock(num_heads=2, mlp_ratio=2.0, modulation=modulation)
    # 'shared' takes the shared [B, 4, D] projection, 'per_block' the embedding [B, E].
    cond = (jnp.zeros((1, 4, 8)) if modulation == "shared"
            else jnp.asarray(rng.normal(size=(1, 6)), jnp.float32))
    variables = jax.jit(lambda r: block.init(r, tokens, cond))(jax.random.key(1))
    assert set(variables) == {"params"}
    params = nn.unbox(variables)["params"]
    np.testing.assert_array_equal(params["attention"]["out"]["kernel"], 0.0)
    np.testing.assert_array_equal(params["mlp"]["out"]["kernel"], 0.0)
    assert np.std(np.asarray(params["attention"]["query"]["kernel"])) > 0.1
    if modulation == "per_block":
        assert params["modulation"]["kernel"].shape == (6, 4, 8)
        np.testing.assert_array_equal(params["modulation"]["kernel"], 0.0)
        assert "modulation_offset" not in params
    else:
        assert "modulation" not in params
    np.testing.assert_allclose(block.apply(variables, tokens, cond)[0], tokens)
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


# Each option appears once (the two fields are independent code paths), so 3 compiles not 6.
@pytest.mark.parametrize("modulation,qk_norm", [
    ("shared", "rms_learned"), ("per_block", "l2"), ("shared", "none")])
def test_scan_and_remat_match_the_unrolled_stack(modulation, qk_norm):
    options = (("modulation", modulation), ("qk_norm", qk_norm))
    config, apply = _apply_fn("patch", options)
    config_scan, apply_scan = _apply_fn(
        "patch", options + (("scan_layers", True), ("remat", True)))
    params = _random_params(config)
    assert ("transformer_modulation" in params) == (modulation == "shared")
    block0 = params["transformer"]["block_0"]
    assert ("modulation" in block0) == (modulation == "per_block")
    assert ("query_norm" in block0["attention"]) == (qk_norm == "rms_learned")
    assert ("query_l2norm" in block0["attention"]) == (qk_norm == "l2")
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
    # The stacked parameters are the scanned model's own layout ('layers' axis first).
    variables = presets.abstract_variables(config_scan)
    _check_partition_specs(variables)
    stacked = variables["params"]["transformer"]["blocks"]
    assert jax.tree_util.tree_structure(nn.unbox(stacked)) == jax.tree_util.tree_structure(
        scanned["transformer"]["blocks"])
    specs = jax.tree_util.tree_leaves(nn.get_partition_spec(stacked),
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(spec[0] == "layers" for spec in specs)


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


def _np_l2(x, scale):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) * scale


@pytest.mark.parametrize("qk_norm", ["rms_learned", "l2", "none", True, False])
def test_attention_matches_float64_numpy(qk_norm):
    rng = np.random.default_rng(0)
    b, t, d, heads = 2, 5, 8, 2
    hd = d // heads
    x = rng.normal(size=(b, t, d))
    p = {name: {"kernel": rng.normal(size=(d, heads, hd)) / np.sqrt(d),
                "bias": rng.normal(size=(heads, hd)) * 0.1} for name in ("query", "key", "value")}
    p["out"] = {"kernel": rng.normal(size=(heads, hd, d)), "bias": rng.normal(size=(d,))}
    q_scale, k_scale = rng.uniform(0.5, 2.0, size=(hd,)), rng.uniform(0.5, 2.0, size=(hd,))
    mode = {True: "rms_learned", False: "none"}.get(qk_norm, qk_norm)
    if mode == "rms_learned":
        p["query_norm"], p["key_norm"] = {"scale": q_scale}, {"scale": k_scale}
    elif mode == "l2":
        p["query_l2norm"], p["key_l2norm"] = {"scale": q_scale}, {"scale": k_scale}
    module = layers.Attention(heads, qk_norm=qk_norm)
    params32 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), p)
    # apply rejects parameters the module does not create, so this also checks the names.
    got = np.asarray(jax.jit(module.apply)({"params": params32}, jnp.asarray(x, jnp.float32)))

    proj = {n: np.einsum("btd,dnh->btnh", x, p[n]["kernel"]) + p[n]["bias"]
            for n in ("query", "key", "value")}
    q, k = proj["query"], proj["key"]
    if mode == "rms_learned":  # ViT-22B: RMS-normalised q, k; logits / sqrt(head_dim)
        q, k, logit_scale = _np_rms(q, q_scale), _np_rms(k, k_scale), 1 / np.sqrt(hd)
    elif mode == "l2":  # lucidrains simple_diffusion.py: F.normalize, q/k scales, scale = 8
        q, k, logit_scale = _np_l2(q, q_scale), _np_l2(k, k_scale), 8.0
    else:
        logit_scale = 1 / np.sqrt(hd)
    logits = np.einsum("btnh,bsnh->bnts", q, k) * logit_scale
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attended = np.einsum("bnts,bsnh->btnh", w, proj["value"])
    want = np.einsum("btnh,nhd->btd", attended, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_attention_rejects_unknown_qk_norm():
    with pytest.raises(ValueError, match="qk_norm='rms'"):
        layers.Attention(2, qk_norm="rms").init(jax.random.key(0), jnp.zeros((1, 3, 4)))


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
    ("qk_norm", "rms", "config.qk_norm='rms': use one of 'rms_learned', 'l2', 'none'"),
    ("qk_norm", "True", "config.qk_norm='True': use one of"),  # a string is not a legacy bool
    ("modulation", "adaln", "config.modulation='adaln': use one of 'shared', 'per_block'"),
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


# --- What the model computes between its modules, seen through nn.intercept_methods. ---


def _run_capturing(model, params, z, logsnr, labels, replace=None):
    """One jitted forward that records the model's top-level submodule calls.

    Returns (output, calls): calls[name] = (first positional input, output) for every
    direct submodule of the UViT (e.g. 'down16_to8', 'up8_block0') and for the UViT's own
    methods 'stem_transform' and 'head_transform'. `replace` maps a name to
    fn(input, output) -> the output the model continues with instead.
    """
    replace = replace or {}

    @jax.jit
    def run(params, z, logsnr, labels):
        calls = {}

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            path = context.module.scope.path if context.module.scope is not None else None
            if path == () and context.method_name in ("stem_transform", "head_transform"):
                name = context.method_name
            elif path is not None and len(path) == 1 and context.method_name == "__call__":
                name = path[0]
            else:
                return out
            assert name not in calls, f"{name} called twice"
            if name in replace:
                out = replace[name](args[0], out)
            calls[name] = (args[0], out)
            return out

        with nn.intercept_methods(interceptor):
            out = model.apply({"params": params}, z, logsnr, labels, train=False)
        return out, calls

    out, calls = run(params, z, logsnr, labels)
    return np.asarray(out), jax.tree_util.tree_map(np.asarray, calls)


def _assert_close_and_term_matters(got, want, term):
    """got == want, and `term` (one summand of want) is large enough that dropping it fails."""
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)
    assert np.abs(term).max() > 1e-2 * scale  # removing `term` would break the equality


def test_residual_uvit_up_path_is_up_of_x_minus_after_down_plus_before_down():
    # Two conv levels (16 and 8) so that the order in which the stored activations are
    # used is checked too. The formula is SiD2's x = Up(x - h_after_down) + h_before_down.
    config = _tiny("patch", residual=True, channels=(8, 8), num_res_blocks=(1, 1))
    model = models.create_model(config)
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    _, calls = _run_capturing(model, params, z, logsnr, labels)
    before_down = {res: calls[f"down{res}_to{res // 2}"][0] for res in (16, 8)}
    after_down = {res: calls[f"down{res}_to{res // 2}"][1] for res in (16, 8)}

    transformer_out = calls["transformer_norm"][1].reshape(after_down[8].shape)
    up_in, up_out = calls["up4_to8"]
    _assert_close_and_term_matters(up_in, transformer_out - after_down[8], after_down[8])
    _assert_close_and_term_matters(calls["up8_block0"][0], up_out + before_down[8],
                                   before_down[8])

    up_in, up_out = calls["up8_to16"]
    _assert_close_and_term_matters(up_in, calls["up8_block0"][1] - after_down[16],
                                   after_down[16])
    _assert_close_and_term_matters(calls["up16_block0"][0], up_out + before_down[16],
                                   before_down[16])


@pytest.mark.parametrize("stem,levels", [("dwt", 1), ("dwt", 2), ("patch", 1)])
def test_model_stem_and_head_transforms_are_exact_inverses(stem, levels):
    model = models.create_model(_tiny("patch", stem=stem, dwt_levels=levels))
    rng = np.random.default_rng(0)
    # Non-square, 3 channels: the model's image_size / in_channels play no part here.
    x = jnp.asarray(rng.normal(size=(2, 16, 24, 3)), jnp.float32)
    forward, inverse = jax.jit(model.stem_transform), jax.jit(model.head_transform)
    coeffs = forward(x)
    factor = 2**levels if stem == "dwt" else 1
    assert coeffs.shape == (2, 16 // factor, 24 // factor, 3 * factor**2)
    assert coeffs.dtype == jnp.float32
    np.testing.assert_allclose(inverse(coeffs), x, rtol=0, atol=1e-5)
    if stem == "dwt":
        # Not the identity in disguise: a constant image has LL = the constant (DC gain 1)
        # and every detail band 0 (5/3 high-pass DC gain 0).
        const = forward(jnp.full((1, 16, 24, 3), 0.7, jnp.float32))
        np.testing.assert_allclose(const[..., :3], 0.7, atol=1e-6)
        np.testing.assert_allclose(const[..., 3:], 0.0, atol=1e-6)
    else:
        np.testing.assert_array_equal(coeffs, x)


@pytest.mark.parametrize("levels", [1, 2])
def test_model_runs_its_stem_and_head_transforms(levels):
    config = _tiny("dwt", dwt_levels=levels, in_channels=3)
    model = models.create_model(config)
    params = _random_params(config)
    z, logsnr, labels = _inputs(config)
    # End to end through the model's own code: the head conv's output is replaced by the
    # stem's coefficients of z, and then the model must return z.
    out, calls = _run_capturing(model, params, z, logsnr, labels,
                                replace={"head": lambda _, out: model.stem_transform(z)})
    np.testing.assert_allclose(out, z, rtol=0, atol=1e-5)
    stem_in, stem_out = calls["stem_transform"]
    np.testing.assert_array_equal(stem_in, z)  # the first thing applied to the input
    np.testing.assert_array_equal(calls["stem"][0], stem_out)  # what the stem conv sees
    np.testing.assert_array_equal(calls["head_transform"][0], calls["head"][1])
    np.testing.assert_array_equal(out, calls["head_transform"][1])  # the last thing


# --- The conditioning and QK-norm choices. ---


def test_per_block_modulation_adds_one_projection_per_block():
    shared = presets.count_params(_tiny("patch"))
    per_block = presets.count_params(_tiny("patch", modulation="per_block"))
    c = presets.get_preset("tiny")
    proj = c.emb_dim * 4 * c.transformer_width + 4 * c.transformer_width  # kernel + bias
    offsets = c.transformer_depth * 4 * c.transformer_width
    assert per_block - shared == c.transformer_depth * proj - proj - offsets


def test_per_block_block_equals_shared_block_fed_the_same_projection():
    # The documented equivalence: per_block with (W, b) == shared with cond = SiLU(emb) W + b
    # and a zero offset. Catches a missing SiLU, a transposed kernel or mixed-up rows.
    rng = np.random.default_rng(0)
    b, t, d, e = 2, 6, 8, 5
    tokens = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    emb = rng.normal(size=(b, e))
    per_block = layers.TransformerBlock(num_heads=2, mlp_ratio=2.0, modulation="per_block")
    shared = layers.TransformerBlock(num_heads=2, mlp_ratio=2.0, modulation="shared")
    abstract = nn.unbox(jax.eval_shape(per_block.init, jax.random.key(0), tokens,
                                       jnp.zeros((b, e))))["params"]
    params = jax.tree_util.tree_map(
        lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.5, jnp.float32), abstract)
    kernel, bias = (np.asarray(params["modulation"][k], np.float64) for k in ("kernel", "bias"))
    silu = emb / (1.0 + np.exp(-emb))
    cond = np.einsum("be,ekd->bkd", silu, kernel) + bias
    shared_params = {k: v for k, v in params.items() if k != "modulation"}
    shared_params["modulation_offset"] = jnp.zeros((4, d))
    got = jax.jit(per_block.apply)({"params": params}, tokens, jnp.asarray(emb, jnp.float32))[0]
    want = jax.jit(shared.apply)({"params": shared_params}, tokens,
                                 jnp.asarray(cond, jnp.float32))[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(tokens)).max() > 1e-2  # the block did work


def test_per_block_modulation_carries_the_conditioning_in_the_transformer():
    config, apply = _apply_fn("patch", (("modulation", "per_block"), ("scan_layers", True)))
    params = _random_params(config)
    # Silence the ResBlocks' conditioning: what is left can reach the output only through
    # the transformer blocks' own modulation projections.
    for name in params:
        if "_block" in name:
            params[name]["emb_proj"] = jax.tree_util.tree_map(jnp.zeros_like,
                                                              params[name]["emb_proj"])
    z, logsnr, labels = _inputs(config)
    key = jax.random.key(0)

    def logsnr_effect(p):
        base = np.asarray(apply(p, z, logsnr, labels, False, key))
        moved = np.asarray(apply(p, z, logsnr + 2.0, labels, False, key))
        return np.abs(moved - base).max() / np.std(base)

    assert logsnr_effect(params) > 1e-2
    blocks = params["transformer"]["blocks"]
    silenced = {**params, "transformer": {"blocks": {
        **blocks, "modulation": {**blocks["modulation"],
                                 "kernel": jnp.zeros_like(blocks["modulation"]["kernel"])}}}}
    assert logsnr_effect(silenced) < 1e-6


@pytest.mark.parametrize("legacy,mode", [(True, "rms_learned"), (False, "none")])
def test_config_json_with_bool_qk_norm_and_no_modulation_still_loads(legacy, mode):
    # A workdir's config.json written before the choices existed: qk_norm is a bool and
    # there is no modulation field (sampling.load_run_config rebuilds it like this).
    old = presets.get_preset("tiny").to_dict()
    old["qk_norm"] = legacy
    del old["modulation"]
    config = ml_collections.ConfigDict(json.loads(json.dumps(old)))
    model = uvit.from_config(config, jnp.float32, jnp.float32)
    assert model.qk_norm == mode and model.modulation == "shared"
    want = presets.abstract_variables(_tiny("patch", qk_norm=mode))["params"]
    got = jax.eval_shape(lambda r: model.init(r, *_inputs(config)), jax.random.key(0))["params"]
    assert (jax.tree_util.tree_structure(nn.unbox(got))
            == jax.tree_util.tree_structure(nn.unbox(want)))


def _patch_conv_numpy(x, kernel, bias, p, transpose):
    """Float64 loops: out[i, j] = sum_{dy, dx} x[i*p+dy, j*p+dx] @ k[dy, dx] (conv), or
    out[i*p+dy, j*p+dx] = x[i, j] @ k[p-1-dy, p-1-dx] (flax's transposed conv)."""
    x, kernel = x.astype(np.float64), kernel.astype(np.float64)
    b, h, w, _ = x.shape
    f = kernel.shape[-1]
    if transpose:
        out = np.zeros((b, h * p, w * p, f))
        for i in range(h):
            for j in range(w):
                for dy in range(p):
                    for dx in range(p):
                        out[:, i * p + dy, j * p + dx] = x[:, i, j] @ kernel[p - 1 - dy, p - 1 - dx]
    else:
        out = np.zeros((b, h // p, w // p, f))
        for i in range(h // p):
            for j in range(w // p):
                for dy in range(p):
                    for dx in range(p):
                        out[:, i, j] += x[:, i * p + dy, j * p + dx] @ kernel[dy, dx]
    return out + bias


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("p", [1, 2, 4])
def test_patch_conv_matmul_and_conv_paths_match_numpy_and_flax(p, transpose):
    """The CPU matmul path and the native conv path of PatchConv compute the same p x p,
    stride-p (transposed) conv as a float64 loop and as the flax layer it replaced, with the
    same parameters, the same initial values and gradients equal within float tolerance."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
    flax_layer = (nn.ConvTranspose(5, (p, p), strides=(p, p), padding="VALID",
                                   kernel_init=layers._default_kernel) if transpose
                  else nn.Conv(5, (p, p), strides=(p, p), padding="VALID",
                               kernel_init=layers._default_kernel))
    flax_vars = flax_layer.init(jax.random.key(1), x)
    # A non-zero bias, so that the bias path is checked too.
    variables = {"params": {"kernel": flax_vars["params"]["kernel"],
                            "bias": jnp.linspace(-1.0, 1.0, 5)}}
    expected = _patch_conv_numpy(x, np.asarray(variables["params"]["kernel"]),
                                 np.asarray(variables["params"]["bias"]), p, transpose)
    flax_grad = jax.grad(lambda v: jnp.sum(jnp.sin(flax_layer.apply(v, x))))(variables)
    for matmul in (True, False):
        layer = layers.PatchConv(5, p, transpose=transpose, matmul=matmul)
        init = nn.unbox(layer.init(jax.random.key(1), x))
        assert jax.tree.structure(init) == jax.tree.structure(nn.unbox(flax_vars))
        np.testing.assert_array_equal(init["params"]["kernel"], flax_vars["params"]["kernel"])
        out = layer.apply(variables, x)
        assert out.shape == expected.shape
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        grad = jax.grad(lambda v, layer=layer: jnp.sum(jnp.sin(layer.apply(v, x))))(variables)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(flax_grad)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_patch_conv_uses_the_matmul_on_cpu_only():
    """The default picks the matmul on the CPU backend for p > 1 (where XLA's weight
    gradient of a strided conv is slow) and would keep the native conv elsewhere."""
    assert layers.patch_matmul_default(2) == (jax.default_backend() == "cpu")
    assert not layers.patch_matmul_default(1)
    x = jnp.ones((1, 4, 4, 2))
    layer = layers.PatchConv(3, 2)
    variables = layer.init(jax.random.key(0), x)
    hlo = jax.jit(layer.apply).lower(variables, x).as_text()
    assert ("convolution" in hlo) != (jax.default_backend() == "cpu")


@pytest.mark.parametrize("channels", [64, 48, 8])
def test_group_norm_matches_float64_numpy_and_flax(channels):
    """GroupNorm32 (per-channel sums, then groups) equals a float64 NumPy GroupNorm with
    gcd(32, C) groups, and equals nn.GroupNorm with the same parameters, values and
    gradients, within float tolerance; its parameter tree is nn.GroupNorm's under 'norm'."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 6, 5, channels)) * 3.0 + 1.5).astype(np.float32)
    scale = rng.normal(size=(channels,)).astype(np.float32)
    bias = rng.normal(size=(channels,)).astype(np.float32)
    groups = np.gcd(32, channels)
    x64 = x.astype(np.float64).reshape(3, 6, 5, groups, channels // groups)
    mean = x64.mean(axis=(1, 2, 4), keepdims=True)
    var = x64.var(axis=(1, 2, 4), keepdims=True)
    expected = ((x64 - mean) / np.sqrt(var + 1e-6)).reshape(x.shape) * scale + bias

    layer = layers.GroupNorm32()
    init = nn.unbox(layer.init(jax.random.key(0), x))
    assert jax.tree.map(np.shape, init) == {"params": {"norm": {"bias": (channels,),
                                                                "scale": (channels,)}}}
    np.testing.assert_array_equal(init["params"]["norm"]["scale"], np.ones(channels))
    variables = {"params": {"norm": {"scale": scale, "bias": bias}}}
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-4, atol=1e-4)

    flax_layer = nn.GroupNorm(num_groups=int(groups))
    flax_vars = {"params": {"scale": scale, "bias": bias}}
    np.testing.assert_allclose(layer.apply(variables, x), flax_layer.apply(flax_vars, x),
                               rtol=1e-5, atol=1e-5)

    def loss(fn, v, x):
        return jnp.sum(jnp.sin(fn(v, x)) * x)

    g = jax.grad(functools.partial(loss, layer.apply), argnums=(0, 1))(variables, x)
    g_flax = jax.grad(functools.partial(loss, flax_layer.apply), argnums=(0, 1))(flax_vars, x)
    np.testing.assert_allclose(g[1], g_flax[1], rtol=1e-4, atol=1e-4)
    for name in ("scale", "bias"):
        np.testing.assert_allclose(g[0]["params"]["norm"][name], g_flax[0]["params"][name],
                                   rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("channels, modulated", [(64, True), (48, False), (8, True)])
def test_group_norm_silu_backward_matches_autodiff_and_float64(channels, modulated):
    """group_norm_silu's hand-written backward gives autodiff's gradients of
    silu(group_norm(x) * (1 + s) + t) for x, scale, bias, s and t, and its forward the
    float64 NumPy values of the same expression."""
    rng = np.random.default_rng(1)
    b = 3
    x = (rng.normal(size=(b, 6, 5, channels)) * 2.0 + 0.5).astype(np.float32)
    scale = (1.0 + 0.3 * rng.normal(size=(channels,))).astype(np.float32)
    bias = (0.3 * rng.normal(size=(channels,))).astype(np.float32)
    s = (0.3 * rng.normal(size=(b, channels))).astype(np.float32)
    t = (0.3 * rng.normal(size=(b, channels))).astype(np.float32)
    groups = int(np.gcd(32, channels))
    if not modulated:
        s, t = np.zeros_like(s), np.zeros_like(t)
    mod = (s, t) if modulated else None

    x64 = x.astype(np.float64).reshape(b, 6, 5, groups, channels // groups)
    xhat = ((x64 - x64.mean(axis=(1, 2, 4), keepdims=True))
            / np.sqrt(x64.var(axis=(1, 2, 4), keepdims=True) + 1e-6)).reshape(x.shape)
    z = (xhat * scale + bias) * (1 + s[:, None, None]) + t[:, None, None]
    np.testing.assert_allclose(
        layers.group_norm_silu(x, scale, bias, groups, mod), z / (1 + np.exp(-z)),
        rtol=1e-4, atol=1e-4)

    weights = rng.normal(size=x.shape).astype(np.float32)

    def fused(x, scale, bias, s, t):
        return jnp.sum(layers.group_norm_silu(x, scale, bias, groups, (s, t)) * weights)

    def autodiff(x, scale, bias, s, t):
        y = layers.group_norm(x, scale, bias, groups) * (1 + s[:, None, None]) + t[:, None, None]
        return jnp.sum(jax.nn.silu(y) * weights)

    got = jax.grad(fused, argnums=range(5))(x, scale, bias, s, t)
    want = jax.grad(autodiff, argnums=range(5))(x, scale, bias, s, t)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(w))))


def test_res_block_fused_norm_matches_autodiff_path(monkeypatch):
    """ResBlock with the fused GroupNorm-SiLU (the CPU default) and with autodiff's ops:
    the same parameter tree, outputs and gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
    emb = jax.random.normal(jax.random.key(1), (2, 32))
    block = layers.ResBlock(24)
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(layers, "fused_norm_silu_default", lambda fused=fused: fused)
        variables = block.init(jax.random.key(2), x, emb, False)
        # Non-zero conv2 so the output depends on the norms.
        variables = jax.tree.map(lambda v: v + 0.05, variables)
        out = block.apply(variables, x, emb, False)
        grads = jax.grad(lambda v, x: jnp.sum(jnp.sin(block.apply(v, x, emb, False))),
                         argnums=(0, 1))(variables, x)
        results[fused] = (jax.tree.map(np.shape, variables), out, grads)
    assert results[True][0] == results[False][0]
    np.testing.assert_allclose(results[True][1], results[False][1], rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(results[True][2]), jax.tree.leaves(results[False][2])):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.max(np.abs(w))))


@pytest.mark.parametrize("first", [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-45, -3.5])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cotangent_barrier_is_the_identity_both_ways_bit_for_bit(first, dtype):
    """The never-taken branch of the barrier's conditional (zeros) is never taken, whatever
    the cotangent's first element is (signed zeros, NaN, infinities, a subnormal)."""
    x = jnp.linspace(-2.0, 2.0, 24, dtype=dtype).reshape(2, 3, 4)
    g = jax.random.normal(jax.random.key(0), x.shape, dtype).at[0, 0, 0].set(first)
    bits = np.uint32 if dtype == jnp.float32 else np.uint16

    def forward_and_backward(x, g):
        out, vjp = jax.vjp(layers.cotangent_barrier, x)
        return out, vjp(g)[0]

    out, dx = jax.jit(forward_and_backward)(x, g)
    assert out.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(out).view(bits), np.asarray(x).view(bits))
    np.testing.assert_array_equal(np.asarray(dx).view(bits), np.asarray(g).view(bits))


def _largest_fusion(compiled_text: str) -> int:
    """Instructions in the largest fused computation of an optimised HLO module's text."""
    sizes = [len(block.splitlines()) for block in compiled_text.split("\n\n")
             if block.lstrip().startswith(("%fused", "fused"))]
    return max(sizes)


def backward_fusion_sizes() -> tuple[dict, list]:
    """The largest fusion (lines) in the compiled `jax.grad` of a stack of 1 and 4
    TransformerBlocks with and without the cotangent barrier, keyed (barrier, depth), and
    the 4-block gradients [with, without]. Checks the barrier's conditionals survive."""
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    cond = 0.1 * jax.random.normal(jax.random.key(1), (2, 4, 32))
    weights = jax.random.normal(jax.random.key(2), x.shape)
    block = layers.TransformerBlock(2, 4.0, qk_norm="l2")
    params = [block.init(jax.random.key(3 + i), x, cond) for i in range(4)]
    # Non-zero branch outputs so that every block's backward is exercised.
    params = jax.tree.map(lambda v: v + 0.02, params)

    def loss(params, x):
        for p in params:
            x = block.apply(p, x, cond)[0]
        return jnp.sum(x * weights)

    largest, grads = {}, []
    default = layers.cotangent_barrier_default
    try:
        for barrier in (True, False):
            layers.cotangent_barrier_default = lambda b=barrier: b
            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
            for depth in (1, 4):
                text = grad.lower(params[:depth], x).compile().as_text()
                largest[barrier, depth] = _largest_fusion(text)
                assert text.count(" conditional(") == (2 * depth if barrier else 0)
            grads.append(grad(params, x))
    finally:
        layers.cotangent_barrier_default = default
    return largest, grads


def test_cotangent_barrier_keeps_transformer_backward_fusions_flat_in_depth():
    """XLA:CPU fuses the residual stream's gradient into every consumer, so without the
    barrier the backward's largest fusion grows with depth (O(depth^2) work); with it, the
    conditionals survive optimisation and a 4-block stack's fusions stay the size of one
    block's. Gradients are unchanged. The growth shows without the process flags'
    multi-output fusion (a subprocess that opts out), which bounds it too (this process)."""
    largest, grads = backward_fusion_sizes()
    assert largest[True, 4] <= largest[True, 1] + 10, largest
    assert largest[False, 4] <= largest[False, 1] + 10, largest
    for got, want in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(want))))
    off = dict(eval_without_process_flags(
        "test_models", "sorted(test_models.backward_fusion_sizes()[0].items())"))
    assert off[True, 4] <= off[True, 1] + 10, off
    assert off[False, 4] > 2 * off[False, 1], off
