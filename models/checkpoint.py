"""Hugging Face Llama checkpoints: safetensors reading, name mapping, tokenizer.

The reader is the safetensors format itself (8-byte little-endian header length, a JSON header of
``name -> {dtype, shape, data_offsets}``, then the raw bytes), memory-mapped with numpy: a tensor is
only read when a device shard asks for its slice, so no host ever holds the whole model, and loading
needs neither torch nor the ``safetensors`` package.

Hugging Face stores a linear layer as ``[out_features, in_features]``; this package stores
``[in, out...]`` (see ``models/llama.py``), so linear weights are transposed then reshaped, e.g.
``q_proj.weight [heads * head_dim, dim] -> [dim, heads, head_dim]``. Embeddings, LM head and norm
weights keep their layout. Every tensor is checked against the shape the config implies.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsFile", "Checkpoint", "hf_name", "hf_layout", "load_tokenizer"]

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Lazy, memory-mapped view of one ``.safetensors`` file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) != 8:
                    raise ValueError("file shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                size = os.fstat(f.fileno()).st_size
                if n > size - 8:
                    raise ValueError(f"header length {n} exceeds the file size {size}")
                header = json.loads(f.read(n))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
            raise ValueError(f"malformed safetensors file {path!r}: {e}") from e
        if not isinstance(header, dict):
            raise ValueError(f"malformed safetensors file {path!r}: header is not a JSON object")
        header.pop("__metadata__", None)
        self._base = 8 + n
        self._size = size
        self._map = None
        self.entries = header
        for name, entry in header.items():
            try:
                dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"malformed safetensors entry {name!r} in {path!r}: {entry!r}") from e
            if dtype not in _DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
            if hi - lo != nbytes or lo < 0 or self._base + hi > size:
                raise ValueError(
                    f"{path}: tensor {name!r} data_offsets {[lo, hi]} do not fit shape {shape} {dtype} "
                    f"in a file of {size} bytes")

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only memory-mapped array (nothing is read until it is sliced)."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        lo, hi = e["data_offsets"]
        raw = self._map[self._base + lo:self._base + hi]
        return raw.view(_DTYPES[e["dtype"]]).reshape(e["shape"])


def hf_name(path: tuple) -> str:
    """Hugging Face tensor name of the parameter at NNX state path ``path``."""
    dotted = ".".join(str(p) for p in path)
    if dotted == "lm_head":
        return "lm_head.weight"
    return f"model.{dotted}" if path[-1] == "weight" else f"model.{dotted}.weight"  # norms hold `weight`


class Checkpoint:
    """A Hugging Face checkpoint folder: ``config.json`` plus one or more ``*.safetensors`` files
    (with ``model.safetensors.index.json`` when sharded)."""

    def __init__(self, folder: str):
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint folder {folder!r} does not exist")
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"malformed checkpoint index {index!r}: {e}") from e
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors files in checkpoint folder {folder!r}")
        self._where: dict[str, SafetensorsFile] = {}
        for file in files:
            path = os.path.join(folder, file)
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {folder!r} lists {file!r}, which does not exist")
            st = SafetensorsFile(path)
            for name in st.entries:
                self._where[name] = st

    def read(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...]) -> np.ndarray:
        """Tensor ``name`` in this package's layout ``shape`` (a lazy view; see the module docstring)."""
        if name not in self._where:
            raise ValueError(f"checkpoint {self.folder!r} has no tensor {name!r}")
        file = self._where[name]
        expected, linear = hf_layout(tuple(shape), tuple(axes))
        if file.shape(name) != expected:
            raise ValueError(
                f"checkpoint tensor {name!r} has shape {list(file.shape(name))}, but the config implies "
                f"{list(expected)}")
        array = file.get(name)
        # .T of a C-ordered [out, in] view splits cleanly into our axes: still a view, nothing read yet.
        return array.T.reshape(shape) if linear else array


def hf_layout(shape: tuple[int, ...], axes: tuple[str, ...]) -> tuple[tuple[int, ...], bool]:
    """(Hugging Face shape, whether it is a transposed linear weight) for a weight of ``shape``/``axes``."""
    if len(shape) == 1 or axes[0] == "vocab":
        return shape, False
    if axes[0] == "embed":  # input-side projection: [dim, out...]
        return (int(np.prod(shape[1:])), shape[0]), True
    return (shape[-1], int(np.prod(shape[:-1]))), True  # output-side projection: [in..., dim]


def load_tokenizer(folder: str):
    """The ``tokenizers.Tokenizer`` in ``folder/tokenizer.json``, or None (no file, or no ``tokenizers``)."""
    path = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(path)
