"""Read MXNet ``.params`` weight files without MXNet (``NDArray::Save`` / ``NDArray::Load``).

The format follows mxnet ``src/ndarray/ndarray.cc``: a magic number, the arrays one after another
(V3, V2, V1 or pre-0.9 legacy records), then their names. Reads go through the shared
`facecloak.models.file_reader.StreamReader`, so a damaged file fails with a one-line
`ModelNotFoundError`, never a crash, and array data lands in writable buffers without a copy.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facecloak.errors import ModelNotFoundError
from facecloak.models.file_reader import StreamReader

__all__ = ["ParamsFile", "read_mxnet_params", "read_params_file"]

PARAMS_ERROR_PREFIX = "not a valid MXNet .params file"
"""What a failure says the file is (the start of every reader error)."""

PARAMS_FILE_MAGIC = 0x112
"""First uint64 of an ``NDArray::Save`` list file."""
NDARRAY_V1_MAGIC = 0xF993FAC8
"""Array record with int64 dims, no storage type (MXNet 0.9 - 0.11)."""
NDARRAY_V2_MAGIC = 0xF993FAC9
"""Array record with a storage type before the int64 dims (MXNet >= 0.11)."""
NDARRAY_V3_MAGIC = 0xF993FACA
"""Like V2, written under numpy shape semantics: ndim 0 is a scalar, ndim -1 an unknown shape."""

_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("<f8"),
    2: np.dtype("<f2"),
    3: np.dtype("u1"),
    4: np.dtype("<i4"),
    5: np.dtype("i1"),
    6: np.dtype("<i8"),
    7: np.dtype("?"),
}
"""MXNet type flags (``mshadow::TypeFlag``) this reader understands."""


@dataclass(frozen=True)
class ParamsFile:
    """What a ``.params`` file holds: arrays by bare name, and which names were ``aux:`` states."""

    arrays: dict[str, np.ndarray]
    aux_names: frozenset[str]


def _read_ndarray(reader: StreamReader, index: int) -> np.ndarray:
    """Read one ``NDArray::Save`` record (V3, V2, V1 or pre-0.9 legacy), as ``NDArray::Load`` does."""
    what = f"array {index}"
    (magic,) = reader.unpack("I", f"{what} header")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (storage_type,) = reader.unpack("i", f"{what} storage type")
        if storage_type != 0:
            reader.fail(f"{what} has sparse storage type {storage_type}, only dense (0) is supported")
    if magic in (NDARRAY_V1_MAGIC, NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC):
        (ndim,) = reader.unpack("i", f"{what} ndim")
        if ndim > 32:
            reader.fail(f"{what} claims {ndim} dimensions")
        shape = reader.unpack(f"{max(ndim, 0)}q", f"{what} shape")
    else:  # pre-0.9 files: no magic, the uint32 just read is ndim and the dims are uint32
        ndim = magic
        if ndim > 32:
            reader.fail(f"bad array magic 0x{magic:08X} for {what}")
        shape = reader.unpack(f"{ndim}I", f"{what} shape")
    # An empty NDArray is written as its shape alone: ndim 0 (-1 under numpy shape semantics).
    if (ndim == 0 and magic != NDARRAY_V3_MAGIC) or ndim < 0 or any(d < 0 for d in shape):
        return np.zeros((0,), dtype=np.float32)
    _device_type, _device_id, type_flag = reader.unpack("iii", f"{what} context and dtype")
    dtype = _DTYPES.get(type_flag)
    if dtype is None:
        reader.fail(f"{what} has unknown dtype flag {type_flag}")
    n_bytes = math.prod(shape) * dtype.itemsize
    data = np.frombuffer(reader.read_buffer(n_bytes, f"{what} data"), dtype=dtype).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)


def read_params_file(path: Path) -> ParamsFile:
    """Parse a ``.params`` file into named arrays, remembering which were ``aux:`` (running) states."""
    path = Path(path)
    try:
        stream = path.open("rb")
    except OSError as err:
        raise ModelNotFoundError(f"cannot open MXNet .params file: {err.strerror or err}", path) from err
    with stream:
        reader = StreamReader(stream, os.fstat(stream.fileno()).st_size, path, PARAMS_ERROR_PREFIX)
        (magic,) = reader.unpack("Q", "file header")
        if magic != PARAMS_FILE_MAGIC:
            reader.fail(f"bad file magic 0x{magic:X} (expected 0x{PARAMS_FILE_MAGIC:X})")
        _reserved, n_arrays = reader.unpack("QQ", "file header")
        arrays = [_read_ndarray(reader, index) for index in range(n_arrays)]
        (n_names,) = reader.unpack("Q", "name count")
        if n_names != n_arrays:
            reader.fail(f"{n_arrays} arrays but {n_names} names")
        named: dict[str, np.ndarray] = {}
        aux_names: set[str] = set()
        for index, array in enumerate(arrays):
            (length,) = reader.unpack("Q", f"name {index} length")
            try:
                full_name = reader.read_bytes(length, f"name {index}").decode("utf-8")
            except UnicodeDecodeError:
                reader.fail(f"name {index} is not UTF-8")
            kind, sep, name = full_name.partition(":")
            if not sep or kind not in ("arg", "aux"):
                kind, name = "arg", full_name
            if name in named:
                reader.fail(f"parameter {name!r} appears twice")
            named[name] = array
            if kind == "aux":
                aux_names.add(name)
    return ParamsFile(named, frozenset(aux_names))


def read_mxnet_params(path: Path) -> dict[str, np.ndarray]:
    """Read an MXNet ``.params`` file without MXNet.

    Reads every array format MXNet has written (pre-0.9 legacy, V1 ``0xF993FAC8``, V2 ``0xF993FAC9``,
    V3 numpy-shape), dense storage only, dtypes float32/64/16, uint8, int8, int32, int64 and bool.
    The ``arg:``/``aux:`` prefixes are dropped; `MXNetGraph` gets the distinction from the file
    itself (aux arrays become buffers), so callers rarely need it.

    Args:
        path: the ``NAME-EPOCH.params`` file.

    Returns:
        Arrays by parameter name (e.g. ``"conv1_weight"``, ``"bn1_moving_mean"``), native byte order,
        in file order.

    Raises:
        ModelNotFoundError: missing or unreadable file, bad magic, truncated data, unknown dtype,
            sparse storage; the message is one line naming the file.

    Example:
        >>> arrays = read_mxnet_params(Path("MobileFace_Identification_V2-0000.params"))  # doctest: +SKIP
        >>> arrays["conv1_weight"].shape  # doctest: +SKIP
        (32, 3, 3, 3)

    """
    return read_params_file(path).arrays
