"""A GGUF file's metadata and tensors, read directly.

The gguf package's `GGUFReader` took 23 s to open gemma3_270m's file: it
makes NumPy views of each entry of the 262k-piece vocabulary arrays, one at
a time. This reads the same layout (GGUF versions 2 and 3, either byte
order) with `struct` over a memory map. The gguf package still names the
tensor types and dequantizes them.
"""

import dataclasses
import struct

import numpy as np

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Metadata value types (the GGUF specification's numbering).
_STRING, _ARRAY = 8, 9
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
# Tensor types stored as plain NumPy arrays; every other type is raw bytes.
_PLAIN_TENSOR_TYPES = {"F16": "f2", "F32": "f4", "F64": "f8", "I8": "i1", "I16": "i2", "I32": "i4", "I64": "i8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    shape: tuple  # GGML's order: the row (innermost) dimension first.
    data: np.ndarray  # NumPy's order, read-only; quantized: each row's bytes.


class GGUFFile:
    """`fields`: metadata key -> Python value (lists for arrays);
    `tensors`: `GGUFTensor`s in file order. A damaged file raises
    `ValueError` (or the gguf package's error for an unknown tensor type)."""

    def __init__(self, path):
        self._buffer = memoryview(np.memmap(path, mode="r"))
        if bytes(self._buffer[:4]) != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        self._position = 4
        self._order = "<"
        version = self._read("I")
        if version & 0xFFFF == 0:  # Written on a machine of the other byte order.
            self._order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in SUPPORTED_VERSIONS:
            raise ValueError(f"GGUF version {version} is not supported (only {SUPPORTED_VERSIONS})")
        tensor_count, field_count = self._read("Q"), self._read("Q")
        self.fields = {}
        for _ in range(field_count):
            key = self._read_string()
            self.fields[key] = self._read_value(self._read("I"))
        infos = [self._read_tensor_info() for _ in range(tensor_count)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-self._position // alignment) * alignment
        self.tensors = [self._tensor(*info, data_start) for info in infos]
        if len({tensor.name for tensor in self.tensors}) != len(self.tensors):
            raise ValueError("it lists a tensor name twice")

    def _take(self, size):
        start = self._position
        if size < 0 or start + size > len(self._buffer):
            raise ValueError(f"it ends inside its header (at byte {len(self._buffer)})")
        self._position += size
        return start

    def _read(self, code):
        fmt = self._order + code
        return struct.unpack_from(fmt, self._buffer, self._take(struct.calcsize(fmt)))[0]

    def _read_string(self):
        size = self._read("Q")
        start = self._take(size)
        return str(self._buffer[start:start + size], "utf-8")

    def _read_value(self, value_type):
        if value_type == _STRING:
            return self._read_string()
        if value_type in _SCALAR_FORMATS:
            return self._read(_SCALAR_FORMATS[value_type])
        if value_type != _ARRAY:
            raise ValueError(f"unknown metadata value type {value_type}")
        item_type, count = self._read("I"), self._read("Q")
        if item_type in _SCALAR_FORMATS:  # Numbers: one NumPy read.
            dtype = np.dtype(self._order + _SCALAR_FORMATS[item_type])
            start = self._take(count * dtype.itemsize)
            return np.frombuffer(self._buffer, dtype, count, start).tolist()
        if count * 8 > len(self._buffer) - self._position:  # 8 bytes each at least.
            raise ValueError(f"it ends inside its header (an array of {count} entries at byte {self._position})")
        return [self._read_value(item_type) for _ in range(count)]

    def _read_tensor_info(self):
        import gguf

        name = self._read_string()
        shape = tuple(self._read("Q") for _ in range(self._read("I")))
        tensor_type = gguf.GGMLQuantizationType(self._read("I"))
        return name, shape, tensor_type, self._read("Q")

    def _tensor(self, name, shape, tensor_type, offset, data_start):
        import gguf

        numpy_shape = tuple(reversed(shape))
        plain = _PLAIN_TENSOR_TYPES.get(tensor_type.name)
        if plain is None:
            dtype = np.dtype("u1")
            numpy_shape = gguf.quants.quant_shape_to_byte_shape(numpy_shape, tensor_type)
        else:
            dtype = np.dtype(self._order + plain)
        count = int(np.prod(numpy_shape))
        start = data_start + offset
        if start + count * dtype.itemsize > len(self._buffer):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        data = np.frombuffer(self._buffer, dtype, count, start).reshape(numpy_shape)
        return GGUFTensor(name, tensor_type, shape, data)
