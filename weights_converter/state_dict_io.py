"""Reading PyTorch and safetensors state_dicts into numpy, without PyTorch.

A ``.pth`` file is a pickle, and unpickling can run arbitrary code. This
reader never imports torch and resolves only the few globals a state_dict
needs (the tensor rebuild functions, the storage types, OrderedDict); any
other global in the file is refused before anything is built from it.
"""

import collections
import io
import json
import os
import pickle
import struct
import zipfile

import numpy as np

from medt_keras.errors import LoadError


class CheckpointError(LoadError):
    """A checkpoint file that cannot be read or does not match the model."""


_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": "bfloat16",
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _numpy_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _numpy_dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_unused):
    if isinstance(storage, _DeferredStorage):
        return _DeferredTensor(storage, (storage_offset, size, stride))
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride):
        raise CheckpointError(f"a tensor has shape {size} but strides {stride}")
    itemsize = storage.dtype.itemsize
    needed = storage_offset + (
        1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
    )
    if needed > storage.size:
        raise CheckpointError(
            f"a tensor of shape {size} needs {needed} elements but its storage holds {storage.size}"
        )
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:],
        shape=size,
        strides=tuple(s * itemsize for s in stride),
        writeable=False,
    )
    return np.array(view)


def _rebuild_parameter(data, *_unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only state_dict globals and reads storages lazily."""

    def __init__(self, file, load_storage, source):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source
        self._storages = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        hint = ""
        if not module.startswith(("torch", "collections", "numpy")):
            hint = (
                " If this is a whole pickled model (torch.save(model)), save its "
                "model.state_dict() instead."
            )
        raise CheckpointError(
            f"{self._source}: refusing to load '{module}.{name}': a state_dict holds only "
            f"tensors, and loading this global could run code from the file.{hint}"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"{self._source}: storage of unknown type {storage_type!r}")
        cache_key = (key, storage_type.name)
        if cache_key not in self._storages:
            self._storages[cache_key] = self._load_storage(str(key), storage_type.dtype, numel)
        storage = self._storages[cache_key]
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view_key, offset, size)
            _view_key, offset, size = pid[5]
            storage = storage[offset : offset + size]
        return storage


def _read_zip_pth(path):
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: the zip archive is damaged or "
            f"truncated ({error})."
        ) from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}.")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode().strip()

        def load_storage(key, dtype, numel):
            name = f"{prefix}data/{key}"
            try:
                raw = archive.read(name)
            except KeyError:
                raise CheckpointError(f"{path}: storage {name} is missing from the archive.") from None
            except (zipfile.BadZipFile, EOFError, OSError) as error:
                raise CheckpointError(f"{path}: storage {name} is damaged ({error}).") from None
            dt = dtype.newbyteorder("<" if byteorder == "little" else ">")
            if len(raw) < numel * dt.itemsize:
                raise CheckpointError(
                    f"{path}: storage {name} holds {len(raw)} bytes, {numel * dt.itemsize} expected."
                )
            return np.frombuffer(raw, dtype=dt, count=numel).astype(dtype)

        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, EOFError, OSError) as error:
            raise CheckpointError(f"{path}: {pickles[0]} is damaged ({error}).") from None
        return _unpickle(data, load_storage, path)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _DeferredStorage:
    """A legacy-format storage whose bytes come after the pickle that uses it."""

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.size = key, dtype, numel
        self.offset = 0

    def __getitem__(self, item):  # a legacy view into a larger storage
        view = _DeferredStorage(self.key, self.dtype, self.size)
        view.offset = self.offset + (item.start or 0)
        return view


class _DeferredTensor:
    def __init__(self, storage, args):
        self.storage, self.args = storage, args

    def resolve(self, storages):
        data = storages[self.storage.key][self.storage.offset :]
        return _rebuild_tensor(data, *self.args)


def _read_legacy_pth(path):
    """The pre-1.6 format (``torch.save(..., _use_new_zipfile_serialization=False)``).

    A sequence of pickles (magic number, protocol, system info, the object,
    the storage keys) followed by each storage's element count and bytes.
    """
    with open(path, "rb") as f:
        stream = io.BytesIO(f.read())
    deferred = {}

    def load_storage(key, dtype, numel):
        deferred.setdefault(key, (dtype, numel))
        return _DeferredStorage(key, dtype, numel)

    try:
        header = _RestrictedUnpickler(stream, None, path)
        if header.load() != _LEGACY_MAGIC:
            raise CheckpointError(
                f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)."
            )
        header.load()  # protocol version
        header.load()  # system info
        obj = _RestrictedUnpickler(stream, load_storage, path).load()
        keys = _RestrictedUnpickler(stream, None, path).load()
        storages = {}
        for key in keys:
            (numel,) = struct.unpack("<q", stream.read(8))
            dtype = deferred.get(key, (np.dtype(np.uint8), 0))[0]
            raw = stream.read(numel * dtype.itemsize)
            if len(raw) != numel * dtype.itemsize:
                raise EOFError(f"storage {key} ends early")
            storages[key] = np.frombuffer(raw, dtype=dtype).copy()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError) as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated or damaged ({error})."
        ) from None

    def resolve(value):
        if isinstance(value, _DeferredTensor):
            return value.resolve(storages)
        if isinstance(value, dict):
            return type(value)((k, resolve(v)) for k, v in value.items())
        return value

    return resolve(obj)


def _unpickle_stream(stream, load_storage, source):
    try:
        return _RestrictedUnpickler(stream, load_storage, source).load()
    except CheckpointError:
        raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError) as error:
        raise CheckpointError(
            f"{source}: not a readable PyTorch checkpoint: the pickle is truncated or damaged ({error})."
        ) from None


def _unpickle(data, load_storage, source):
    return _unpickle_stream(io.BytesIO(data), load_storage, source)


def _read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    try:
        (header_size,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + header_size])
    except (struct.error, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable safetensors file ({error}).") from None
    data = memoryview(blob)[8 + header_size :]
    tensors = collections.OrderedDict()
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}.")
        if end > len(data):
            raise CheckpointError(f"{path}: tensor {key!r} lies past the end of the file (truncated?).")
        dtype = _numpy_dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
        tensors[key] = array.astype(dtype.newbyteorder("="))
    return tensors


def _find_state_dict(obj, path):
    """The tensor dict inside what was saved: the dict itself, or its 'state_dict'/'model' entry."""
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                return _find_state_dict(obj[key], path)
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensor names to tensors)."
    )


def read_state_dict(path):
    """Reads a PyTorch state_dict (``.pth``/``.pt``/``.bin``) or ``.safetensors`` file.

    Never imports PyTorch and never executes code from the file: only the
    globals a state_dict needs are resolved, anything else raises
    ``CheckpointError`` naming the global. Reads the zip format of
    ``torch.save`` (PyTorch >= 1.6) and the older legacy format. A
    ``module.`` prefix (``nn.DataParallel``) is stripped from every key; a
    checkpoint dict holding the weights under ``state_dict`` or ``model`` is
    unwrapped.

    Returns:
        dict from key to ``numpy.ndarray``, in the file's order.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file.")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path}: the file is empty.")
    if path.endswith(".safetensors"):
        tensors = _read_safetensors(path)
    elif head.startswith(b"PK"):
        tensors = _find_state_dict(_read_zip_pth(path), path)
    else:
        tensors = _find_state_dict(_read_legacy_pth(path), path)
    result = collections.OrderedDict()
    for key, value in tensors.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        result[key] = value
    return result
