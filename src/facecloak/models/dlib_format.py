"""Read dlib's binary serialization format (``dlib/serialize.h``) in pure Python.

dlib's model files (the face-recognition ResNet, the shape predictors) are nothing but
``dlib::serialize`` calls written one after another, with no table of contents: to read one you
replay the writer's calls in order. `DlibReader` gives one method per primitive the writer uses, so
a model loader reads like the C++ ``serialize`` function it mirrors. Nothing here imports dlib.

Format (as dlib writes it, checked against ``dlib/serialize.h``, ``dlib/float_details.h`` and
``dlib/cuda/tensor.h``):
    - integer: a control byte, whose low 4 bits give the number of magnitude bytes (1 to 8) and
      whose bit 0x80 marks a negative value, then that many little-endian bytes. Zero is ``01 00``.
      Unsigned integers are written the same way, without the sign bit.
    - bool: one ASCII byte, ``'1'`` or ``'0'``.
    - string: an unsigned integer length, then the raw bytes (no terminator).
    - float / double: an int64 mantissa *then* an int16 exponent, value ``mantissa * 2**exponent``
      (the comment in ``serialize.h`` lists them the other way round); exponents 32000, 32001 and
      32002 mean +inf, -inf and NaN.
    - ``std::vector<T>``: an unsigned integer length, then each element.
    - ``dlib::matrix<T>``: ``-nr`` and ``-nc`` as signed integers (negated to mark the newer
      format; older files have them positive), then the elements row by row.
    - ``dlib::vector<T, 2>`` (a point): ``x`` then ``y``.
    - DNN tensor (``resizable_tensor``): version 2, the four dimensions (samples, k, nr, nc) as
      integers, then the raw little-endian float32 data, not the float format above.
    - DNN ``alias_tensor``: version 1 and the four dimensions, no data (a view into ``params``).

Every failure (truncated file, impossible size, unexpected tag) raises
`facecloak.errors.ModelNotFoundError` with a one-line reason naming the byte offset, so a corrupt
download reads as "this model is not available" rather than a numpy traceback.

Example:
    >>> reader = DlibReader(bytes([0x01, 0x05, ord("1"), 0x01, 0x02]) + b"hi")
    >>> reader.read_int(), reader.read_bool(), reader.read_string()
    (5, True, 'hi')
    >>> reader.expect_end()

"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from facecloak.errors import ModelNotFoundError
from facecloak.models.file_reader import ModelFileReader

__all__ = ["DlibLayer", "DlibNet", "DlibReader", "locate_package_model", "read_dlib_net"]

T = TypeVar("T")

FLOAT_EXPONENT_INF = 32000
"""``float_details::is_inf``: the value is +infinity."""
FLOAT_EXPONENT_NINF = 32001
"""``float_details::is_ninf``: the value is -infinity."""
FLOAT_EXPONENT_NAN = 32002
"""``float_details::is_nan``: the value is NaN."""
TENSOR_VERSION = 2
"""Version dlib writes before a ``resizable_tensor``."""
ALIAS_TENSOR_VERSION = 1
"""Version dlib writes before an ``alias_tensor``."""
MAX_STRING_BYTES = 1 << 20
"""Longest string we accept; dlib only writes short version tags, so more means a corrupt file."""
MAX_TENSOR_ELEMENTS = 1 << 40
"""Most elements a tensor's non-zero dimensions may span: an empty tensor (no data to read) with a
huge dimension beside its zero made numpy fail with a ValueError traceback."""


class DlibReader(ModelFileReader):
    """Sequential reader over the bytes of one dlib-serialized file.

    Each ``read_*`` consumes one serialized object and advances `position`. Readers for
    containers (`read_list`, `read_matrix`) take the element reader as an argument, because
    dlib's format carries no type information: the caller knows what was written. Bounds checks
    and the error convention come from `facecloak.models.file_reader.ModelFileReader`.

    Args:
        data: the whole file.
        path: where it came from, used only in error messages.

    """

    def __init__(self, data: bytes, path: str | Path | None = None) -> None:
        super().__init__(data, path, "malformed dlib file")

    @classmethod
    def from_file(cls, path: str | Path) -> DlibReader:
        """Read the whole file at ``path``; raise `ModelNotFoundError` if it cannot be read."""
        try:
            return cls(Path(path).read_bytes(), path)
        except OSError as error:
            reason = f"cannot read dlib model file ({error.strerror or error})"
            raise ModelNotFoundError(reason, path) from None

    def describe(self, reason: str) -> str:
        """Dlib's files have no structure to point at, so a failure names its byte offset."""
        return f"{self.error_prefix}: {reason} at byte {self.position}"

    def expect_end(self) -> None:
        """Check that the whole file has been consumed: trailing bytes mean we misread it."""
        if self.remaining:
            self.fail(f"{self.remaining} unexpected trailing bytes")

    # ----------------------------------------------------------------------------------------------
    # primitives

    def _read_magnitude(self, what: str) -> tuple[int, bool]:
        # The hot path of every file (a shape predictor holds a million floats): kept lean.
        data, start = self._data, self.position
        if start >= len(data):
            self.fail(f"file truncated while reading {what}")
        control = data[start]
        size = control & 0x0F
        if size == 0 or size > 8:
            self.fail(f"bad integer control byte 0x{control:02x} while reading {what}")
        end = start + 1 + size
        if end > len(data):
            self.fail(f"file truncated while reading {what}")
        self.position = end
        return int.from_bytes(data[start + 1 : end], "little"), control >= 0x80

    def read_int(self, what: str = "an integer") -> int:
        """Read a signed integer of any width (``int``, ``long``, ``int64``...)."""
        magnitude, negative = self._read_magnitude(what)
        return -magnitude if negative else magnitude

    def read_uint(self, what: str = "an unsigned integer") -> int:
        """Read an unsigned integer (``unsigned long``, ``size_t``...); a sign bit is an error, as in dlib."""
        start = self.position
        magnitude, negative = self._read_magnitude(what)
        if negative:
            self.position = start
            self.fail(f"negative value while reading {what}")
        return magnitude

    def read_bool(self, what: str = "a bool") -> bool:
        """Read a bool, stored as ASCII ``'1'`` or ``'0'``."""
        byte = self.read_bytes(1, what)
        if byte not in (b"0", b"1"):
            self.position -= 1
            self.fail(f"bad bool byte 0x{byte[0]:02x} while reading {what}")
        return byte == b"1"

    def read_string(self, what: str = "a string") -> str:
        """Read a ``std::string`` (length, then bytes), decoded as UTF-8."""
        length = self.read_uint(what)
        if length > MAX_STRING_BYTES:
            self.fail(f"implausible string length {length} while reading {what}")
        raw = self.read_bytes(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.position -= length
            self.fail(f"undecodable bytes while reading {what}")

    def expect_string(self, *allowed: str) -> str:
        """Read a version tag that must be one of ``allowed``; return which one it was."""
        start = self.position
        tag = self.read_string("a version tag")
        if tag not in allowed:
            self.position = start
            self.fail(f"expected {' or '.join(map(repr, allowed))}, found {tag[:40]!r}")
        return tag

    def expect_int(self, *allowed: int, what: str = "a version number") -> int:
        """Read an integer (usually a version number) that must be one of ``allowed``."""
        start = self.position
        value = self.read_int(what)
        if value not in allowed:
            self.position = start
            self.fail(f"expected {what} in {sorted(allowed)}, found {value}")
        return value

    def read_float(self, what: str = "a float") -> float:
        """Read a ``float`` or ``double``: int64 mantissa, then int16 exponent.

        dlib also reads an older ASCII float format (recognisable by bits 0x70 of the first
        byte); no model file we load uses it, so it is rejected rather than guessed at.
        """
        if self.remaining >= 1 and self._data[self.position] & 0x70:
            self.fail(f"old ASCII float encoding (unsupported) while reading {what}")
        mantissa = self.read_int(what)
        exponent = self.read_int(what)
        if exponent == FLOAT_EXPONENT_INF:
            return math.inf
        if exponent == FLOAT_EXPONENT_NINF:
            return -math.inf
        if exponent == FLOAT_EXPONENT_NAN:
            return math.nan
        if not -(1 << 15) <= exponent < FLOAT_EXPONENT_INF:
            self.fail(f"float exponent {exponent} out of range while reading {what}")
        try:
            return math.ldexp(float(mantissa), exponent)
        except OverflowError:
            self.fail(f"float overflow while reading {what}")

    def read_floats(self, count: int, what: str = "floats") -> list[float]:
        """``count`` consecutive floats, as `read_float` would read them one by one, but faster.

        Shape predictors store about a million floats this way; the common case (a plain
        mantissa and exponent) is decoded inline, and anything unusual (special values, a
        malformed or truncated entry) goes through `read_float` for its exact handling and error.
        """
        data, position, size = self._data, self.position, len(self._data)
        values: list[float] = []
        for _ in range(count):
            mantissa_control = data[position] if position < size else 0
            exponent_at = position + 1 + (mantissa_control & 0x0F)
            exponent_control = data[exponent_at] if exponent_at < size else 0
            end = exponent_at + 1 + (exponent_control & 0x0F)
            plain = (
                not (mantissa_control | exponent_control) & 0x70
                and 0 < mantissa_control & 0x0F <= 8
                and 0 < exponent_control & 0x0F <= 2
                and end <= size
            )
            if plain:
                mantissa = int.from_bytes(data[position + 1 : exponent_at], "little")
                exponent = int.from_bytes(data[exponent_at + 1 : end], "little")
                plain = exponent < 960 or exponent_control & 0x80  # else special or overflowing
            if plain:
                mantissa = -mantissa if mantissa_control & 0x80 else mantissa
                values.append(math.ldexp(mantissa, -exponent if exponent_control & 0x80 else exponent))
                position = end
            else:
                self.position = position
                values.append(self.read_float(what))
                position = self.position
        self.position = position
        return values

    # ----------------------------------------------------------------------------------------------
    # containers

    def read_list(self, read_item: Callable[[], T], what: str = "a std::vector") -> list[T]:
        """Read a ``std::vector``: its length, then ``read_item()`` for each element."""
        length = self.read_uint(what)
        if length > self.remaining:  # every element takes at least one byte
            self.fail(f"implausible length {length} while reading {what}")
        return [read_item() for _ in range(length)]

    def read_matrix(self, read_element: Callable[[], float] | None = None) -> np.ndarray:
        """Read a ``dlib::matrix`` as an ``(nr, nc)`` float32 array (elements via ``read_element``).

        Args:
            read_element: reader of one element; default `read_float` (``matrix<float>`` and
                ``matrix<double>``; doubles are narrowed to float32).

        """
        rows = abs(self.read_int("matrix rows"))
        cols = abs(self.read_int("matrix columns"))
        if rows * cols > self.remaining:  # every element takes at least one byte
            self.fail(f"implausible matrix size {rows}x{cols}")
        if read_element is None:
            values = self.read_floats(rows * cols, "matrix elements")
        else:
            values = [read_element() for _ in range(rows * cols)]
        return np.asarray(values, dtype=np.float32).reshape(rows, cols)

    def read_column_vector(self) -> np.ndarray:
        """Read a ``dlib::matrix<float, 0, 1>`` as a 1-D float32 array."""
        start = self.position
        matrix = self.read_matrix()
        if matrix.shape[1] != 1 and matrix.size:
            self.position = start
            self.fail(f"expected a column vector, found a {matrix.shape[0]}x{matrix.shape[1]} matrix")
        return matrix.reshape(-1)

    def read_point2(self) -> tuple[float, float]:
        """Read a ``dlib::vector<float, 2>`` (also ``dpoint``) as ``(x, y)``."""
        return self.read_float("a point's x"), self.read_float("a point's y")

    # ----------------------------------------------------------------------------------------------
    # DNN tensors

    def read_tensor(self) -> np.ndarray:
        """Read a DNN ``resizable_tensor`` as a ``(num_samples, k, nr, nc)`` float32 array."""
        self.expect_int(TENSOR_VERSION, what="the tensor version")
        shape = tuple(self.read_int("a tensor dimension") for _ in range(4))
        if min(shape) < 0:
            self.fail(f"negative tensor shape {shape}")
        if math.prod(d for d in shape if d) > MAX_TENSOR_ELEMENTS:  # numpy cannot even shape it empty
            self.fail(f"implausible tensor shape {shape}")
        count = math.prod(shape)
        raw = self.read_bytes(4 * count, f"a tensor of shape {shape}")
        return np.frombuffer(raw, dtype="<f4").astype(np.float32).reshape(shape)

    def read_alias_tensor(self) -> tuple[int, int, int, int]:
        """Read a DNN ``alias_tensor``: only its shape, ``(num_samples, k, nr, nc)``."""
        self.expect_int(ALIAS_TENSOR_VERSION, what="the alias_tensor version")
        shape = tuple(self.read_int("an alias_tensor dimension") for _ in range(4))
        if min(shape) < 0:
            self.fail(f"negative alias_tensor shape {shape}")
        return shape  # type: ignore[return-value]


def locate_package_model(filename: str) -> Path | None:
    """Find ``filename`` among the models of the installed ``face_recognition_models`` package.

    The package is located with `importlib.util.find_spec`, never imported: its ``__init__``
    needs ``pkg_resources``, which recent setuptools no longer provides.
    """
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / filename
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# whole networks: a dlib DNN .dat file (the face-recognition ResNet)


@dataclass(frozen=True)
class DlibLayer:
    """One layer of a serialized dlib network.

    Attributes:
        kind: ``"con"``, ``"affine"``, ``"relu"``, ``"max_pool"``, ``"avg_pool"``, ``"add_prev"``,
            ``"fc"``, or ``"tag"`` for a tag or skip layer (the file cannot tell them apart).
        version: dlib's version tag, e.g. ``"con_4"`` (empty for tag/skip).
        config: integers describing the layer: con ``(filters, nr, nc, stride_y, stride_x,
            padding_y, padding_x)``; pools ``(nr, nc, stride_y, stride_x, padding_y, padding_x)``
            (``nr = nc = 0``: the whole image); fc ``(outputs, inputs, bias_mode)``; affine
            ``(mode,)``; others ``()``.
        params: the layer's flat float32 parameters as stored (``None`` if it has none). con:
            filters ``(out, in, nr, nc)`` then biases; affine: scales then shifts; fc: weights
            ``(inputs, outputs)`` then biases if it has any.

    """

    kind: str
    version: str
    config: tuple[int, ...] = ()
    params: np.ndarray | None = None


@dataclass(frozen=True)
class DlibNet:
    """A serialized dlib network: its input layer, layers in forward order, and loss.

    Attributes:
        input_version: the input layer's tag, e.g. ``"input_rgb_image_sized"``.
        mean_rgb: the input layer's per-channel mean (0..255).
        input_size: ``(rows, columns)`` of a sized input layer, else ``None``.
        layers: input to output.
        loss: the loss layer's tag, e.g. ``"loss_metric_2"``.

    """

    input_version: str
    mean_rgb: tuple[float, float, float]
    input_size: tuple[int, int] | None
    layers: tuple[DlibLayer, ...]
    loss: str


_LOSS_VERSIONS = ("loss_metric_", "loss_metric_2")
_INPUT_VERSIONS = ("input_rgb_image", "input_rgb_image_sized")
_ADD_LAYER_VERSION = 2  # add_layer<LAYER, SUBNET>: version, subnet, details, state (1 is too old)
_TAG_OR_SKIP_VERSION = 1  # add_tag_layer / add_skip_layer: version, subnet
_INPUT_ADD_LAYER_VERSIONS = (2, 3)  # add_layer<LAYER, INPUT>: 3 adds _sample_expansion_factor


def _read_add_layer_state(reader: DlibReader) -> None:
    """Skip an add_layer's run-time state: three bools and three (empty) cached tensors."""
    for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, ..._disabled
        reader.read_bool("add_layer state")
    for _ in range(3):  # x_grad, cached_output, and params_grad (grad_final for the input's)
        reader.read_tensor()


def _read_layer_details(reader: DlibReader) -> DlibLayer:
    """One computational layer's details (``serialize(layer_details)``), dispatched on its tag."""
    version = reader.expect_string(
        "con_4", "con_5", "con_6", "affine_", "affine_2", "relu_", "relu_2", "max_pool_2", "avg_pool_2",
        "add_prev_", "fc_2", "fc_3",
    )  # fmt: skip
    kind = version.rsplit("_", 1)[0] if version[-1].isdigit() else version.rstrip("_")
    if kind == "con":
        params = reader.read_tensor().reshape(-1)
        config = tuple(reader.read_int("con settings") for _ in range(7))
        reader.read_alias_tensor()  # filters view, (out, in, nr, nc)
        reader.read_alias_tensor()  # biases view, (1, out, 1, 1)
        for _ in range(4):  # learning-rate and weight-decay multipliers
            reader.read_float("con multipliers")
        if version in ("con_5", "con_6") and not reader.read_bool("con use_bias"):
            reader.fail("convolution without bias is not supported")
        if version == "con_6" and reader.read_bool("con use_relu"):
            reader.fail("convolution with fused relu is not supported")
        return DlibLayer(kind, version, config, params)
    if kind == "affine":
        params = reader.read_tensor().reshape(-1)
        reader.read_alias_tensor()  # gamma view
        reader.read_alias_tensor()  # beta view
        mode = reader.read_int("affine mode")
        if version == "affine_2" and reader.read_bool("affine disabled"):
            reader.fail("disabled affine layer is not supported")
        return DlibLayer(kind, version, (mode,), params)
    if kind == "relu":
        if version == "relu_2" and reader.read_bool("relu disabled"):
            reader.fail("disabled relu layer is not supported")
        return DlibLayer(kind, version)
    if kind in ("max_pool", "avg_pool"):
        return DlibLayer(kind, version, tuple(reader.read_int("pool settings") for _ in range(6)))
    if kind == "fc":
        outputs, inputs = reader.read_uint("fc outputs"), reader.read_uint("fc inputs")
        params = reader.read_tensor()
        reader.read_alias_tensor()  # weights view, (inputs, outputs)
        reader.read_alias_tensor()  # biases view
        bias_mode = reader.read_int("fc bias mode")
        for _ in range(4):
            reader.read_float("fc multipliers")
        if version == "fc_3":
            reader.read_bool("fc use_bias")
        return DlibLayer(kind, version, (outputs, inputs, bias_mode), params.reshape(-1))
    return DlibLayer(kind, version)  # add_prev_


def _starts_input_layer(reader: DlibReader) -> bool:
    """Whether an input layer's tag comes next (without consuming it)."""
    start = reader.position
    try:
        return reader.read_string("a layer tag").startswith("input_")
    except ModelNotFoundError:
        return False
    finally:
        reader.position = start


def read_dlib_net(path: Path | str) -> DlibNet:
    """Parse a dlib DNN file whose layers are among con, affine, relu, pools, add_prev, fc.

    dlib writes a network recursively from the loss end: ``add_loss_layer`` writes its version and
    loss details, then its subnetwork; each ``add_layer`` writes its version, then its *whole
    subnetwork*, then its own details and state; tag and skip layers write a version (1) and their
    subnetwork. So the file holds all the layers' version numbers first, output to input, then the
    input layer, then each layer's details in forward order. That is how this reader walks it.

    Args:
        path: the ``.dat`` file.

    Returns:
        The parsed network; tensors are copied out of the file as float32 arrays.

    Raises:
        ModelNotFoundError: unreadable, truncated, or holding something other than such a network.

    """
    reader = DlibReader.from_file(path)
    reader.expect_int(1, what="the loss layer version")
    loss = reader.expect_string(*_LOSS_VERSIONS)
    if loss == "loss_metric_2":
        reader.read_float("loss margin")
        reader.read_float("loss distance threshold")

    wrappers: list[int] = []  # add_layer / tag-or-skip versions, output end first
    while True:
        version = reader.read_int("a layer version")
        if version in _INPUT_ADD_LAYER_VERSIONS and _starts_input_layer(reader):
            input_add_layer_version = version
            break
        if version not in (_ADD_LAYER_VERSION, _TAG_OR_SKIP_VERSION):
            reader.fail(f"unexpected layer version {version}")
        wrappers.append(version)

    input_version = reader.expect_string(*_INPUT_VERSIONS)
    mean_rgb = (
        reader.read_float("mean red"),
        reader.read_float("mean green"),
        reader.read_float("mean blue"),
    )
    input_size = None
    if input_version == "input_rgb_image_sized":
        input_size = (reader.read_uint("input rows"), reader.read_uint("input columns"))

    layers = [_read_layer_details(reader)]  # the layer on top of the input shares its add_layer
    _read_add_layer_state(reader)
    if input_add_layer_version >= 3:
        reader.read_int("sample expansion factor")
    for wrapper in reversed(wrappers):
        if wrapper == _TAG_OR_SKIP_VERSION:
            layers.append(DlibLayer("tag", ""))
        else:
            layers.append(_read_layer_details(reader))
            _read_add_layer_state(reader)
    reader.expect_end()
    return DlibNet(input_version, mean_rgb, input_size, tuple(layers), loss)
