"""FID InceptionV3: architecture, pytorch-fid resize, torch-format weight conversion.

The real weights cannot be assumed, so weight files here are synthetic, written
in torch's zip format with zipfile + pickle (no torch), exactly as
`torch.save` lays them out.
"""

import collections
import io
import pickle
import zipfile

import jax
import numpy as np
import pytest

from simple_diffusion.evaluation import convert_inception_weights
from simple_diffusion.evaluation import features
from simple_diffusion.evaluation import inception_v3
from simple_diffusion.evaluation import torch_pickle

# One xdist worker runs this module (pytest.ini: --dist loadgroup), so its
# module-scoped fixtures are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("inception")

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage",
                  np.dtype(np.int64): "LongStorage"}


class _TorchGlobal:
    """Pickles as a reference to `module.name` without importing it."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):
        raise AssertionError("only ever pickled")


class _Storage:

    def __init__(self, key, flat):
        self.key, self.flat = key, flat


class _Tensor:
    """A view (offset, shape, element strides) into a storage, like torch's."""

    def __init__(self, storage, offset, shape, stride):
        self.storage, self.offset, self.shape, self.stride = (
            storage, offset, shape, stride)

    def __reduce__(self):
        return (_TorchGlobal("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, self.offset, self.shape, self.stride, False,
                 collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
    """The pure-Python pickler, taught torch's storage persistent ids."""

    dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

    def save_torch_global(self, obj):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    dispatch[_TorchGlobal] = save_torch_global

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            storage_type = _TorchGlobal("torch", _STORAGE_NAMES[obj.flat.dtype])
            return ("storage", storage_type, obj.key, "cpu", obj.flat.size)
        return None


def _write_zip_torch_file(path, tensors):
    """`torch.save` of an OrderedDict name -> `_Tensor` (zip format)."""
    buffer = io.BytesIO()
    _TorchPickler(buffer, protocol=2).dump(collections.OrderedDict(tensors))
    storages = {t.storage.key: t.storage for t in tensors.values()}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for key, storage in storages.items():
            little_endian = storage.flat.dtype.newbyteorder("<")
            archive.writestr(f"archive/data/{key}",
                             storage.flat.astype(little_endian).tobytes())


def _contiguous(key, array):
    array = np.ascontiguousarray(array)
    strides = tuple(s // array.itemsize for s in array.strides)
    return _Tensor(_Storage(key, array.reshape(-1)), 0, array.shape, strides)


def _pytorch_fid_state_dict(rng):
    """Random weights under pytorch-fid's names and torch layouts."""
    tensors = {}
    for path, shape in jax.tree_util.tree_leaves_with_path(
            inception_v3.variable_shapes()):
        collection, *module, leaf = [k.key for k in path]
        prefix = ".".join(module)
        if leaf == "kernel" and len(shape.shape) == 4:  # HWIO -> OIHW
            h, w, i, o = shape.shape
            tensors[f"{prefix}.weight"] = rng.normal(
                0, np.sqrt(2 / (h * w * i)), (o, i, h, w))
        elif leaf == "kernel":  # [in, out] -> [out, in]
            tensors[f"{prefix}.weight"] = rng.normal(0, 0.02, shape.shape[::-1])
        elif leaf == "scale":
            tensors[f"{prefix}.weight"] = rng.uniform(0.5, 1.5, shape.shape)
        elif leaf == "bias":
            tensors[f"{prefix}.bias"] = rng.normal(0, 0.1, shape.shape)
        elif leaf == "mean":
            tensors[f"{prefix}.running_mean"] = rng.normal(0, 0.1, shape.shape)
        else:
            assert (collection, leaf) == ("batch_stats", "var")
            tensors[f"{prefix}.running_var"] = rng.uniform(0.5, 1.5, shape.shape)
            tensors[f"{prefix}.num_batches_tracked"] = np.array(0, np.int64)
    return {k: v.astype(np.float32) if v.dtype == np.float64 else v
            for k, v in tensors.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(state dict, path of its converted .npz)."""
    directory = tmp_path_factory.mktemp("inception")
    state_dict = _pytorch_fid_state_dict(np.random.default_rng(0))
    pth = str(directory / "pt_inception-synthetic.pth")
    _write_zip_torch_file(pth, {name: _contiguous(str(i), value)
                                for i, (name, value) in enumerate(state_dict.items())})
    npz = str(directory / "inception.npz")
    convert_inception_weights.convert(pth, npz)
    return state_dict, npz


def test_parameter_count_matches_pytorch_fid():
    shapes = inception_v3.variable_shapes()
    # torchvision's Inception3 has 27,161,264 parameters; without its
    # auxiliary classifier (3,326,696) and with 1008 instead of 1000 classes
    # (+ 8 * 2048 + 8) that is pytorch-fid's FIDInceptionV3.
    expected = 27_161_264 - 3_326_696 + 8 * 2048 + 8
    count = sum(x.size for x in jax.tree.leaves(shapes["params"]))
    assert count == expected == inception_v3.NUM_PARAMS
    # 94 conv + BatchNorm units (stem 5, A 3 x 7, B 4, C 4 x 10, D 6, E 2 x 9).
    assert len(jax.tree.leaves(shapes["batch_stats"])) == 2 * 94


def test_known_pytorch_fid_tensor_shapes(converted):
    state_dict, _ = converted
    assert len(state_dict) == 94 * 6 + 2
    for name, shape in [("Conv2d_1a_3x3.conv.weight", (32, 3, 3, 3)),
                        ("Mixed_5b.branch_pool.conv.weight", (32, 192, 1, 1)),
                        ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
                        ("Mixed_7a.branch7x7x3_4.conv.weight", (192, 192, 3, 3)),
                        ("Mixed_7c.branch3x3dbl_3b.conv.weight", (384, 384, 3, 1)),
                        ("Mixed_7c.branch_pool.conv.weight", (192, 2048, 1, 1)),
                        ("fc.weight", (1008, 2048)), ("fc.bias", (1008,))]:
        assert state_dict[name].shape == shape, name


def test_converter_round_trips_a_zip_torch_file(converted):
    state_dict, npz = converted
    with np.load(npz) as data:
        arrays = dict(data)
    assert len(arrays) == len(state_dict) - 94  # num_batches_tracked dropped
    np.testing.assert_array_equal(
        arrays["params/Conv2d_1a_3x3/conv/kernel"],
        state_dict["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(arrays["params/fc/kernel"], state_dict["fc.weight"].T)
    np.testing.assert_array_equal(
        arrays["params/Mixed_6e/branch7x7dbl_4/bn/scale"],
        state_dict["Mixed_6e.branch7x7dbl_4.bn.weight"])
    np.testing.assert_array_equal(
        arrays["batch_stats/Mixed_7b/branch3x3_2a/bn/var"],
        state_dict["Mixed_7b.branch3x3_2a.bn.running_var"])
    variables = inception_v3.load_variables(npz)
    assert jax.tree.structure(variables) == jax.tree.structure(
        inception_v3.variable_shapes())


def test_converter_rejects_incomplete_weights(tmp_path):
    pth = str(tmp_path / "partial.pth")
    bias = _contiguous("0", np.zeros(1008, np.float32))
    _write_zip_torch_file(pth, {"fc.bias": bias})
    with pytest.raises(ValueError, match="variables without a tensor"):
        inception_v3.variables_from_torch_file(pth)


def test_zip_reader_honours_offsets_strides_and_shared_storage(tmp_path):
    storage = _Storage("0", np.arange(12, dtype=np.float32))
    ints = _Storage("1", np.array([5, -3], np.int64))
    tensors = {"matrix": _Tensor(storage, 0, (3, 4), (4, 1)),
               "transposed": _Tensor(storage, 0, (4, 3), (1, 4)),
               "tail": _Tensor(storage, 8, (2, 2), (2, 1)),
               "scalar": _Tensor(ints, 1, (), ())}
    path = str(tmp_path / "views.pth")
    _write_zip_torch_file(path, tensors)
    loaded = torch_pickle.load_state_dict(path)
    full = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(loaded["matrix"], full)
    np.testing.assert_array_equal(loaded["transposed"], full.T)
    np.testing.assert_array_equal(loaded["tail"], [[8, 9], [10, 11]])
    assert loaded["scalar"].shape == () and loaded["scalar"] == -3
    assert loaded["scalar"].dtype == np.int64


def _torch_bilinear_resize(image, out_h, out_w):
    """torch F.interpolate(mode="bilinear", align_corners=False), in NumPy."""
    def axis_weights(n_in, n_out):
        src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        src = np.maximum(src, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = src - lo
        w = np.zeros((n_out, n_in))
        w[np.arange(n_out), lo] += 1 - frac
        w[np.arange(n_out), hi] += frac
        return w
    wh, ww = axis_weights(image.shape[0], out_h), axis_weights(image.shape[1], out_w)
    return np.einsum("ah,hwc->awc", wh, np.einsum("bw,hwc->hbc", ww, image))


@pytest.mark.parametrize("size", [(32, 20), (512, 400)])
def test_preprocess_resizes_like_pytorch_fid(size):
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 255, size + (3,)).astype(np.float32)
    expected = _torch_bilinear_resize(image.astype(np.float64), 299, 299) / 127.5 - 1
    got = np.asarray(inception_v3.preprocess(image[None]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_random_weights_give_standard_shapes(converted):
    _, npz = converted
    extract = features.get_feature_extractor("inception_v3", npz, batch_size=2,
                                             return_logits=True)
    images = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), np.uint8)
    feats, logits = extract(images)
    assert feats.shape == (2, inception_v3.NUM_FEATURES) == (2, 2048)
    assert logits.shape == (2, inception_v3.NUM_CLASSES) == (2, 1008)
    assert np.isfinite(feats).all() and np.isfinite(logits).all()
    assert (np.asarray(feats) >= 0).all()  # average of ReLU outputs
    assert not np.allclose(feats[0], feats[1])


def test_inception_needs_a_weights_path():
    with pytest.raises(ValueError, match="convert_inception_weights"):
        features.get_feature_extractor("inception_v3")
