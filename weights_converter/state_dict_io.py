"""Reading PyTorch and safetensors state_dicts into numpy, without PyTorch.

A ``.pth`` file is a pickle, and unpickling can run arbitrary code. This
reader never imports torch and resolves only the few globals a state_dict
needs (the tensor rebuild functions, the storage types, OrderedDict); any
other global in the file is refused before anything is built from it.

The numbers inside the tensor records are not trusted either. Unpickling
only records each tensor (storage, offset, shape, strides); every record
is then validated before a byte of its storage is read or a tensor is
allocated: non-negative sizes, strides and offsets, element counts and byte
extents within bounds, the view inside its storage, the storage's bytes
exactly those the pickle declares, and no tensor materialising more bytes
than its storage holds (no stride-0 broadcasts, no overlapping views). What
a file can make the reader allocate is thereby bounded by a small multiple
of the file's size. Every failure, anticipated or not, is a
``CheckpointError`` naming the file and, where there is one, the tensor.
"""

import collections
import gc
import io
import json
import math
import os
import pickle
import reprlib
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

# Any count, stride, offset or byte extent beyond this is refused before
# arithmetic on it (no file this reader can hold comes near it).
_MAX_INT = 2**62
_MAX_DIMS = 32  # numpy allows 64; no state_dict tensor has more than a handful
_MAX_NESTING = 8  # {"state_dict": {"model": ...}} wrappers followed at most this deep

_short_repr = reprlib.Repr()
_short_repr.maxstring = _short_repr.maxother = 60
_short_repr.maxlevel = 3


def _short(value):
    try:
        return _short_repr.repr(value)
    except Exception:  # a repr that fails must not hide the real error
        return f"<{type(value).__name__}>"


def _numpy_dtype(dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _is_int(value):
    return type(value) is int  # not bool, not a float that happens to be whole


def _checked_int(value, what, fail):
    if not _is_int(value):
        fail(f"{what} is {_short(value)}, not an integer")
    if value < 0:
        fail(f"{what} is negative ({value})")
    if value > _MAX_INT:
        fail(f"{what} is implausibly large ({value})")
    return value


def _checked_shape(value, what, fail):
    if not isinstance(value, (tuple, list)):
        fail(f"{what} is {_short(value)}, not a tuple of integers")
    if len(value) > _MAX_DIMS:
        fail(f"{what} has {len(value)} dimensions (at most {_MAX_DIMS} are accepted)")
    return tuple(_checked_int(v, what, fail) for v in value)


def _check_view(size, stride, offset, storage_numel, fail):
    """Validates a strided view into a storage of ``storage_numel`` elements.

    Everything is Python integers (no overflow). The view must lie inside
    the storage and its elements must not overlap (a real state_dict never
    has stride-0 broadcasts or self-overlapping tensors), so it holds at
    most as many elements as the storage.
    """
    if len(size) != len(stride):
        fail(f"shape {size} has {len(size)} dimensions but strides {stride} have {len(stride)}")
    numel = math.prod(size)
    if numel == 0:
        if offset > storage_numel:
            fail(f"storage offset {offset} lies past the end of its storage ({storage_numel} elements)")
        return 0
    if numel > storage_numel:
        fail(f"shape {size} has {numel} elements but its storage holds only {storage_numel}")
    extent = 1  # elements spanned by the dimensions taken so far
    for n, s in sorted(((n, s) for n, s in zip(size, stride) if n > 1), key=lambda d: d[1]):
        if s < extent:
            fail(
                f"shape {size} with strides {stride} makes elements overlap (a stride-0 broadcast "
                "or a self-overlapping view); a state_dict never needs one"
            )
        extent += (n - 1) * s
    if offset + extent > storage_numel:
        fail(
            f"shape {size}, strides {stride} at offset {offset} reach element {offset + extent - 1} "
            f"of a storage of {storage_numel} elements"
        )
    return numel


class _StorageType:
    def __init__(self, name):
        self.name = name
        self.dtype = _numpy_dtype(_STORAGE_DTYPES[name])


class _StorageRef:
    """A storage named by the pickle; its bytes are read only after validation."""

    __slots__ = ("key", "dtype", "numel", "view")

    def __init__(self, key, dtype, numel, view):
        self.key, self.dtype, self.numel, self.view = key, dtype, numel, view


class _TensorRecord:
    """The arguments of a tensor rebuild call, checked and materialised later."""

    __slots__ = ("args",)

    def __init__(self, args):
        self.args = args


def _rebuild_tensor(*args):
    return _TensorRecord(args)


def _rebuild_parameter(data=None, *_unused):
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only state_dict globals and reads no storage.

    The pure-Python unpickler: its memo is a dict, so a memo index from the
    file cannot make it allocate a table of that size (the C unpickler's
    memo is an array sized by the largest index).
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source, declare_storage=None):
        super().__init__(file)
        self._source = source
        self._declare_storage = declare_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        hint = ""
        if not str(module).startswith(("torch", "collections", "numpy")):
            hint = (
                " If this is a whole pickled model (torch.save(model)), save its "
                "model.state_dict() instead."
            )
        raise CheckpointError(
            f"{self._source}: refusing to load '{module}.{name}': a state_dict holds only "
            f"tensors, and loading this global could run code from the file.{hint}"
        )

    def _load_build(self):
        # BUILD sets attributes; only an OrderedDict's (torch's state_dict
        # carries ``_metadata``) are accepted, never those of a function or type.
        state = self.stack.pop()
        inst = self.stack[-1]
        if not (type(inst) is collections.OrderedDict and isinstance(state, dict)):
            raise CheckpointError(
                f"{self._source}: the pickle sets the state of a {type(inst).__name__}; "
                "a state_dict never does that."
            )
        for key, value in state.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{self._source}: the pickle sets an attribute named {_short(key)}.")
            inst.__dict__[key] = value

    dispatch[pickle.BUILD[0]] = _load_build

    def _refuse_buffer(self):
        # BYTEARRAY8 allocates its declared length (up to 2^64) before reading
        # a byte; buffers are protocol 5 out-of-band data. No state_dict uses them.
        raise CheckpointError(
            f"{self._source}: the pickle holds a bytearray or an out-of-band buffer; a state_dict never does."
        )

    for _opcode in (pickle.BYTEARRAY8, pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        dispatch[_opcode[0]] = _refuse_buffer
    del _opcode

    def persistent_load(self, pid):
        def fail(what):
            raise CheckpointError(f"{self._source}: storage record {_short(pid)}: {what}.")

        if self._declare_storage is None:
            fail("a storage where none may be")
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            fail("unsupported persistent id")
        storage_type, key, _location, numel = pid[1:5]
        if not isinstance(storage_type, _StorageType):
            fail(f"storage of unknown type {_short(storage_type)}")
        if not isinstance(key, str):
            fail(f"storage key {_short(key)} is not a string")
        _checked_int(numel, "its element count", fail)
        view = None
        if len(pid) > 5 and pid[5] is not None:  # legacy view: (view_key, offset, size)
            if not (isinstance(pid[5], tuple) and len(pid[5]) == 3):
                fail("malformed storage view")
            _view_key, offset, size = pid[5]
            _checked_int(offset, "its view's offset", fail)
            _checked_int(size, "its view's size", fail)
            if offset + size > numel:
                fail(f"its view of {size} elements at offset {offset} lies outside its {numel} elements")
            view = (offset, size)
        self._declare_storage(key, storage_type.dtype, numel, fail)
        return _StorageRef(key, storage_type.dtype, numel, view)


class _Declarations:
    """Each storage key's dtype and element count, as the pickle declares them (consistently)."""

    def __init__(self):
        self.storages = {}

    def __call__(self, key, dtype, numel, fail):
        previous = self.storages.setdefault(key, (dtype, numel))
        if previous != (dtype, numel):
            fail(
                f"storage {key} declared again as {numel} x {dtype} after {previous[1]} x {previous[0]}"
            )


def _unpickle(stream, source, declare_storage=None):
    return _RestrictedUnpickler(stream, source, declare_storage).load()


def _find_state_dict(obj, path):
    """The tensor dict inside what was saved: the dict itself, or its 'state_dict'/'model' entry."""
    for _ in range(_MAX_NESTING):
        if isinstance(obj, dict) and obj and all(isinstance(v, _TensorRecord) for v in obj.values()):
            for key in obj:
                if not isinstance(key, str):
                    raise CheckpointError(f"{path}: a tensor is named {_short(key)}, not a string.")
            return obj
        if not isinstance(obj, dict):
            break
        for key in ("state_dict", "model_state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        else:
            break
    raise CheckpointError(
        f"{path}: holds a {type(obj).__name__}, not a state_dict (a dict of tensor names to tensors)."
    )


def _materialise(records, path, load_storage):
    """Validates every tensor record, then reads storages and builds the arrays.

    ``load_storage(ref, fail)`` returns the root storage of ``ref`` as a
    native-endian 1-d array of exactly ``ref.numel`` elements.
    """
    plans = []
    for key, record in records.items():

        def fail(what, key=key):
            raise CheckpointError(f"{path}: tensor {key!r}: {what}.")

        args = record.args
        if len(args) < 4:
            fail(f"its record has {len(args)} fields, at least 4 expected")
        storage, offset, size, stride = args[:4]
        if not isinstance(storage, _StorageRef):
            fail(f"its storage is {_short(storage)}, not a storage record")
        offset = _checked_int(offset, "storage offset", fail)
        size = _checked_shape(size, "shape", fail)
        stride = _checked_shape(stride, "strides", fail)
        base, limit = 0, storage.numel
        if storage.view is not None:
            base, limit = storage.view
        numel = _check_view(size, stride, offset, limit, fail)
        plans.append((key, storage, base + offset, size, stride, numel, fail))

    # No two distinct views may together hold more than their storage:
    # what the tensors materialise is bounded by what the storages hold.
    charged = collections.Counter()
    seen = {}
    for key, storage, offset, size, stride, numel, fail in plans:
        identity = (storage.key, offset, size, stride)
        if identity in seen:
            continue
        seen[identity] = None
        charged[storage.key] += numel
        if charged[storage.key] > storage.numel:
            fail(
                f"it overlaps other tensors of storage {storage.key}: together they hold "
                f"{charged[storage.key]} elements of its {storage.numel}"
            )

    tensors = collections.OrderedDict()
    built = {}
    for key, storage, offset, size, stride, numel, fail in plans:
        identity = (storage.key, offset, size, stride)
        if identity not in built:
            data = load_storage(storage, fail)
            itemsize = data.dtype.itemsize
            view = np.lib.stride_tricks.as_strided(
                data[offset:] if numel else data[:0],
                shape=size,
                strides=tuple(s * itemsize for s in stride),
                writeable=False,
            )
            built[identity] = np.array(view)
        tensors[key] = built[identity]
    return tensors


class _ZipEntries:
    """The entries of a zip ``.pth`` archive, each read whole and checked against its declared size."""

    def __init__(self, path, archive):
        self.path, self.archive = path, archive

    def size(self, name, what, limit):
        """The declared uncompressed size of ``name``; an error if it is missing or over ``limit``."""
        try:
            size = self.archive.getinfo(name).file_size
        except KeyError:
            raise CheckpointError(f"{self.path}: {what}: {name} is missing from the archive.") from None
        if size > limit:
            raise CheckpointError(
                f"{self.path}: {what}: {name} claims {size} bytes uncompressed, more than the "
                f"{limit} this reader accepts for it."
            )
        return size

    def read(self, name, size, what):
        """Exactly ``size`` bytes of entry ``name``, never decompressing more than one byte past them."""
        path = self.path
        try:
            info = self.archive.getinfo(name)
        except KeyError:
            raise CheckpointError(f"{path}: {what}: {name} is missing from the archive.") from None
        if info.file_size != size:
            raise CheckpointError(f"{path}: {what}: {name} holds {info.file_size} bytes, {size} expected.")
        try:
            with self.archive.open(info) as handle:
                raw = handle.read(size + 1)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as error:
            raise CheckpointError(f"{path}: {what}: {name} is damaged ({error}).") from None
        if len(raw) != size:
            raise CheckpointError(
                f"{path}: {what}: {name} decompresses to {'more' if len(raw) > size else len(raw)} "
                f"bytes, {size} expected."
            )
        return raw

    def byteorder(self, prefix):
        name = prefix + "byteorder"
        if name not in self.archive.namelist():
            return "little"
        byteorder = self.read(name, self.size(name, "byte order", 16), "byte order").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{self.path}: byte order {byteorder!r} is neither 'little' nor 'big'.")
        return byteorder


def _read_zip_pth(path):
    file_size = os.path.getsize(path)
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: the zip archive is damaged or "
            f"truncated ({error})."
        ) from None
    with archive:
        entries = _ZipEntries(path, archive)
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(set(pickles)) != 1:
            raise CheckpointError(f"{path}: expected one data.pkl in the archive, found {len(pickles)}.")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = entries.byteorder(prefix)
        data = entries.read(pickles[0], entries.size(pickles[0], "the pickle", file_size), "the pickle")
        obj = _unpickle(io.BytesIO(data), path, _Declarations())
        del data
        records = _find_state_dict(obj, path)

        storages = {}
        budget = [file_size]  # storage bytes read in all: at most the file's size

        def load_storage(ref, fail):
            if ref.key not in storages:
                nbytes = ref.numel * ref.dtype.itemsize
                if nbytes > budget[0]:
                    fail(
                        f"its storage {ref.key} ({nbytes} bytes) with the storages before it is "
                        f"larger than the file ({file_size} bytes)"
                    )
                budget[0] -= nbytes
                raw = entries.read(f"{prefix}data/{ref.key}", nbytes, f"storage {ref.key}")
                dt = ref.dtype.newbyteorder("<" if byteorder == "little" else ">")
                storages[ref.key] = np.frombuffer(raw, dtype=dt).astype(ref.dtype)
            return storages[ref.key]

        return _materialise(records, path, load_storage)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_legacy_pth(path):
    """The pre-1.6 format (``torch.save(..., _use_new_zipfile_serialization=False)``).

    A sequence of pickles (magic number, protocol, system info, the object,
    the storage keys) followed by each storage's element count and bytes.
    """
    with open(path, "rb") as f:
        blob = f.read()
    stream = io.BytesIO(blob)
    if _unpickle(stream, path) != _LEGACY_MAGIC:
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)."
        )
    _unpickle(stream, path)  # protocol version
    _unpickle(stream, path)  # system info
    declarations = _Declarations()
    obj = _unpickle(stream, path, declarations)
    keys = _unpickle(stream, path)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError(f"{path}: the storage key list is {_short(keys)}, not a list of strings.")
    if len(set(keys)) != len(keys):
        raise CheckpointError(f"{path}: the storage key list names a storage twice.")
    records = _find_state_dict(obj, path)

    storages = {}
    position = stream.tell()
    for key in keys:
        if key not in declarations.storages:
            raise CheckpointError(f"{path}: storage {key} is listed but no tensor declares it.")
        dtype, declared = declarations.storages[key]
        if position + 8 > len(blob):
            raise CheckpointError(f"{path}: storage {key}: the file ends before its size (truncated?).")
        (numel,) = struct.unpack_from("<q", blob, position)
        position += 8
        if numel != declared:
            raise CheckpointError(
                f"{path}: storage {key} holds {numel} elements but the pickle declares {declared}."
            )
        nbytes = numel * dtype.itemsize
        if position + nbytes > len(blob):
            raise CheckpointError(
                f"{path}: storage {key}: {nbytes} bytes declared, {len(blob) - position} left in the "
                "file (truncated?)."
            )
        storages[key] = (position, nbytes)
        position += nbytes

    converted = {}

    def load_storage(ref, fail):
        if ref.key not in storages:
            fail(f"its storage {ref.key} is not in the file's storage list")
        if ref.key not in converted:
            start, nbytes = storages[ref.key]
            little = ref.dtype.newbyteorder("<")
            converted[ref.key] = np.frombuffer(blob, dtype=little, count=ref.numel, offset=start).astype(
                ref.dtype
            )
        return converted[ref.key]

    return _materialise(records, path, load_storage)


def _read_safetensors(path):
    with open(path, "rb") as f:
        blob = f.read()

    def fail(what):
        raise CheckpointError(f"{path}: not a readable safetensors file: {what}.")

    if len(blob) < 8:
        fail(f"{len(blob)} bytes, shorter than the 8-byte header length")
    (header_size,) = struct.unpack_from("<Q", blob)
    if header_size > len(blob) - 8:
        fail(f"the header length {header_size} runs past the end of the file ({len(blob)} bytes)")
    try:
        header = json.loads(blob[8 : 8 + header_size].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        fail(f"the header is not JSON ({_short(str(error))})")
    if not isinstance(header, dict):
        fail(f"the header is a {type(header).__name__}, not a JSON object")
    data = memoryview(blob)[8 + header_size :]
    plans = []
    for key, info in header.items():
        if key == "__metadata__":
            if not isinstance(info, dict):
                fail("__metadata__ is not an object")
            continue

        def fail_tensor(what, key=key):
            raise CheckpointError(f"{path}: tensor {key!r}: {what}.")

        if not isinstance(info, dict):
            fail_tensor(f"its entry is {_short(info)}, not an object")
        dtype_name = info.get("dtype")
        if not isinstance(dtype_name, str) or dtype_name not in _SAFETENSORS_DTYPES:
            fail_tensor(f"unsupported dtype {_short(dtype_name)}")
        shape = _checked_shape(info.get("shape"), "shape", fail_tensor)
        offsets = info.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2):
            fail_tensor(f"data_offsets {_short(offsets)} is not a pair of integers")
        begin = _checked_int(offsets[0], "its begin offset", fail_tensor)
        end = _checked_int(offsets[1], "its end offset", fail_tensor)
        if not begin <= end <= len(data):
            fail_tensor(f"data_offsets [{begin}, {end}] do not lie within the {len(data)} data bytes")
        dtype = _numpy_dtype(_SAFETENSORS_DTYPES[dtype_name])
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            fail_tensor(f"shape {list(shape)} of {dtype_name} needs {nbytes} bytes, data_offsets give {end - begin}")
        plans.append((begin, end, key, dtype, shape))
    previous_end, previous_key = 0, None
    for begin, end, key, _dtype, _shape in sorted(plans, key=lambda p: (p[0], p[1])):
        if begin < previous_end:
            raise CheckpointError(f"{path}: tensor {key!r}: its bytes overlap those of {previous_key!r}.")
        if end > begin:
            previous_end, previous_key = end, key
    tensors = collections.OrderedDict()
    for begin, end, key, dtype, shape in plans:
        little = dtype.newbyteorder("<")
        tensors[key] = np.frombuffer(data[begin:end], dtype=little).reshape(shape).astype(dtype)
    return tensors


def _read(path):
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"{path}: the file is empty.")
    if path.endswith(".safetensors"):
        return _read_safetensors(path)
    if head.startswith(b"PK"):
        return _read_zip_pth(path)
    return _read_legacy_pth(path)


def read_state_dict(path):
    """Reads a PyTorch state_dict (``.pth``/``.pt``/``.bin``) or ``.safetensors`` file.

    Never imports PyTorch and never executes code from the file: only the
    globals a state_dict needs are resolved, anything else raises
    ``CheckpointError`` naming the global. Reads the zip format of
    ``torch.save`` (PyTorch >= 1.6) and the older legacy format. A
    ``module.`` prefix (``nn.DataParallel``) is stripped from every key; a
    checkpoint dict holding the weights under ``state_dict`` or ``model`` is
    unwrapped.

    Every tensor record is validated before its storage is read (see the
    module docstring); any file that is not a well-formed state_dict raises
    ``CheckpointError`` and no other exception.

    Returns:
        dict from key to ``numpy.ndarray``, in the file's order.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file.")
    # Python's cyclic garbage collector is off while the file is read: the
    # containers the unpickler builds (100,000 nested lists in a crafted file
    # of 200 KB) would otherwise set off full collections, each a walk over
    # every object of the calling process, so that the reading time grew with
    # the caller's heap rather than the file (0.44 of 0.57 s of such a read
    # in a test process holding a few Keras models; more in a larger one).
    collecting = gc.isenabled()
    gc.disable()
    try:
        tensors = _read(path)
    except CheckpointError:
        raise
    except (MemoryError, RecursionError) as error:
        raise CheckpointError(
            f"{path}: not a readable checkpoint: reading it exhausted {type(error).__name__[:-5].lower()}."
        ) from None
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint: truncated or damaged "
            f"({type(error).__name__}: {_short(str(error))})."
        ) from None
    finally:
        if collecting:
            gc.enable()
    result = collections.OrderedDict()
    for key, value in tensors.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        result[key] = value
    return result
