"""Reads `torch.save` files into NumPy arrays without importing torch.

Two on-disk formats exist:

* the zip format (torch >= 1.6): a zip archive holding `<root>/data.pkl`, a
  pickle whose tensors refer to storages by key, and one raw little-endian
  file `<root>/data/<key>` per storage;
* the legacy format (torch < 1.6): one stream of five pickles (magic number,
  protocol version, system info, the object, the list of storage keys)
  followed by every storage as an int64 element count and the raw bytes.

The pre-2017 tar variant of the legacy format is not supported; such files
raise a ValueError naming the problem.

Only the globals a state dict needs are resolved (tensor and parameter
rebuilders, storage types, `OrderedDict`); any other global raises
`pickle.UnpicklingError`, so loading an untrusted file cannot run code.
"""

import collections
import io
import pickle
import struct
import tarfile
import zipfile
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType:
    """Stand-in for a `torch.<X>Storage` class: just its element dtype."""

    def __init__(self, dtype: np.dtype):
        self.dtype = np.dtype(dtype)


class _Storage:
    """A flat typed buffer; `array` is filled when its bytes are read.

    Legacy files pickle tensors before their storage bytes, so tensors keep a
    reference to this holder and are materialised after the whole file is read.
    """

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


class _StorageView:
    """A slice `[offset, offset + numel)` (in elements) of a root storage."""

    def __init__(self, root: _Storage, offset: int, numel: int):
        self.root = root
        self.offset = offset
        self.numel = numel


class _PendingTensor:
    """What a pickled tensor becomes until its storage bytes are known."""

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = tuple(size)
        self.stride = tuple(stride)

    def materialise(self) -> np.ndarray:
        """Returns a C-contiguous copy honouring torch's offset and strides."""
        if isinstance(self.storage, _StorageView):
            root, base = self.storage.root, self.storage.offset
        else:
            root, base = self.storage, 0
        flat = root.array
        if flat is None:
            raise ValueError("torch file ends before all storages were read")
        offset = base + self.storage_offset
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, flat.dtype)
        # as_strided does no bounds checking; a corrupt file must not read
        # outside the buffer.
        last = offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if offset < 0 or last >= flat.size or min(self.stride, default=0) < 0:
            raise ValueError(
                f"tensor of size {self.size} stride {self.stride} offset "
                f"{offset} does not fit its storage of {flat.size} elements")
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=self.size,
            strides=[s * flat.itemsize for s in self.stride], writeable=False)
        return np.array(view, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, unused_requires_grad, unused_hooks, *unused_state):
    return data


_ALLOWED_GLOBALS = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    """Resolves torch globals to stand-ins and storages through `load_storage`."""

    def __init__(self, file: BinaryIO, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module: str, name: str):
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name} from a torch file"
            ) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._load_storage(*pid[1:])


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _PendingTensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_materialise(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if root + "byteorder" in names:
            byteorder = archive.read(root + "byteorder").decode().strip()
        endian = "<" if byteorder == "little" else ">"
        storages: dict[str, _Storage] = {}

        def load_storage(storage_type, key, unused_location, numel):
            if key not in storages:
                raw = archive.read(f"{root}data/{key}")
                if len(raw) != numel * storage_type.dtype.itemsize:
                    raise ValueError(f"{path}: storage {key} has {len(raw)} "
                                     f"bytes, expected {numel} elements")
                dtype = storage_type.dtype.newbyteorder(endian)
                storage = _Storage(storage_type.dtype, numel)
                storage.array = np.frombuffer(raw, dtype).astype(
                    storage_type.dtype, copy=False)
                storages[key] = storage
            return storages[key]

        with archive.open(pickles[0]) as f:
            return _materialise(_Unpickler(io.BytesIO(f.read()), load_storage).load())


def _load_legacy(f: BinaryIO, path: str) -> Any:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path}: not a torch.save file (bad magic number)")
    protocol = pickle.load(f)
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: unsupported legacy protocol {protocol}")
    sys_info = pickle.load(f)
    endian = "<" if sys_info.get("little_endian", True) else ">"
    storages: dict[str, _Storage] = {}

    def load_storage(storage_type, root_key, unused_location, numel,
                     view_metadata=None):
        if root_key not in storages:
            storages[root_key] = _Storage(storage_type.dtype, numel)
        root = storages[root_key]
        if view_metadata is None:
            return root
        _, view_offset, view_numel = view_metadata
        return _StorageView(root, view_offset, view_numel)

    result = _Unpickler(f, load_storage).load()
    for key in pickle.load(f):
        storage = storages[key]
        (numel,) = struct.unpack(endian + "q", f.read(8))
        if numel != storage.numel:
            raise ValueError(f"{path}: storage {key} holds {numel} elements, "
                             f"its tensors expect {storage.numel}")
        nbytes = numel * storage.dtype.itemsize
        raw = f.read(nbytes)
        if len(raw) != nbytes:
            raise ValueError(f"{path}: truncated storage {key}")
        storage.array = np.frombuffer(
            raw, storage.dtype.newbyteorder(endian)).astype(storage.dtype)
    return _materialise(result)


def load(path: str) -> Any:
    """Loads a `torch.save` file, returning tensors as NumPy arrays.

    Args:
      path: a file written by `torch.save` (zip or legacy format).

    Returns:
      The saved object with every tensor (and `nn.Parameter`) replaced by a
      C-contiguous `np.ndarray` of the tensor's shape and dtype (bfloat16 as
      `ml_dtypes.bfloat16`); dicts, `OrderedDict`s, lists and tuples keep
      their type.

    Raises:
      ValueError: the file is not a supported `torch.save` file.
      pickle.UnpicklingError: the pickle refers to a global other than the
        tensor rebuilders, storage types and `OrderedDict`.
    """
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    with open(path, "rb") as f:
        if f.read(2)[:1] == pickle.PROTO:
            f.seek(0)
            return _load_legacy(f, path)
    if tarfile.is_tarfile(path):
        raise ValueError(
            f"{path}: the pre-2017 tar torch format is not supported; re-save "
            "it with a newer torch (torch.save(torch.load(p), p))")
    raise ValueError(f"{path}: not a torch.save file")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Loads a saved `state_dict` as a flat name -> array dict.

    Args:
      path: a `torch.save(model.state_dict(), path)` file.

    Returns:
      A dict in the file's order mapping parameter / buffer names (e.g.
      `"_conv_stem.weight"`) to arrays in torch's layout (conv weights OIHW,
      linear weights [out, in]).
    """
    obj = load(path)
    if not isinstance(obj, dict) or not all(
            isinstance(v, np.ndarray) for v in obj.values()):
        raise ValueError(f"{path}: not a state_dict of tensors")
    return dict(obj)


def to_flax_variables(state_dict: dict[str, np.ndarray], rename,
                      target: dict[str, Any]) -> dict[str, Any]:
    """Converts a torch `state_dict` into a Flax Linen variables tree.

    Every tensor is used exactly once and must land on a leaf of `target` with
    the same shape; every leaf of `target` must be filled. Layouts change as
    Flax expects: 4-D conv weights OIHW -> HWIO (depthwise [C, 1, kh, kw] ->
    [kh, kw, 1, C]), 2-D linear weights [out, in] -> [in, out].

    Args:
      state_dict: name -> array, as returned by `load_state_dict`.
      rename: maps a torch module prefix (the name without its last
        `.weight` / `.bias` / ... part) to the Flax module path (a tuple of
        names). BatchNorm leaves go to `params/{scale,bias}` and
        `batch_stats/{mean,var}`; conv / linear leaves to `params/kernel`
        and `params/bias`; `num_batches_tracked` is dropped.
      target: the variables tree (arrays or `jax.ShapeDtypeStruct`s, e.g.
        from `jax.eval_shape(model.init, ...)`) giving the expected shapes.

    Returns:
      A nested dict shaped like `target` holding float32 NumPy arrays.

    Raises:
      ValueError: a tensor has no place in `target`, a shape differs, or a
        leaf of `target` got no tensor.
    """
    def leaves(tree, prefix=()):
        for k, v in tree.items():
            if hasattr(v, "items"):
                yield from leaves(v, prefix + (k,))
            else:
                yield prefix + (k,), v

    expected = dict(leaves(target))
    filled: dict[tuple, np.ndarray] = {}
    for name, value in state_dict.items():
        module, leaf = name.rsplit(".", 1)
        if leaf == "num_batches_tracked":
            continue
        path = tuple(rename(module))
        if leaf == "running_mean":
            key = ("batch_stats",) + path + ("mean",)
        elif leaf == "running_var":
            key = ("batch_stats",) + path + ("var",)
        elif leaf == "bias":
            key = ("params",) + path + ("bias",)
        elif leaf == "weight" and value.ndim == 1:
            key = ("params",) + path + ("scale",)
        elif leaf == "weight":
            key = ("params",) + path + ("kernel",)
            value = value.transpose((2, 3, 1, 0) if value.ndim == 4 else (1, 0))
        else:
            raise ValueError(f"unexpected tensor {name}")
        if key not in expected:
            raise ValueError(f"tensor {name} -> {'/'.join(key)}: no such variable")
        if key in filled:
            raise ValueError(f"tensor {name} -> {'/'.join(key)}: filled twice")
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"tensor {name} -> {'/'.join(key)}: shape "
                             f"{value.shape} != {expected[key].shape}")
        filled[key] = np.asarray(value, np.float32)
    missing = sorted("/".join(k) for k in expected.keys() - filled.keys())
    if missing:
        raise ValueError(f"variables without a tensor: {missing}")
    tree: dict[str, Any] = {}
    for key, value in filled.items():
        node = tree
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = value
    return tree
