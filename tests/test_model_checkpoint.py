"""Hugging Face checkpoint loading (models/checkpoint.py, models/tp.py) and its error messages."""

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest

from models import tp as tp_lib
from models.checkpoint import Checkpoint, SafetensorsFile, hf_layout, load_tokenizer
from models.config import from_hf_config
from models.generate import Generator

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TINY = os.path.join(FIXTURES, "llama_tiny")
TIED = os.path.join(FIXTURES, "llama_tiny_tied")
_CODES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16"}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def fixture_tensors(folder=TINY):
    st = SafetensorsFile(os.path.join(folder, "model.safetensors"))
    return {name: np.array(st.get(name)) for name in st.entries}


def copy_checkpoint(tmp_path, tensors=None, config_changes=None):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    with open(os.path.join(TINY, "config.json")) as f:
        config = json.load(f)
    config.update(config_changes or {})
    (folder / "config.json").write_text(json.dumps(config))
    write_safetensors(folder / "model.safetensors", fixture_tensors() if tensors is None else tensors)
    return str(folder)


def logits(folder, tp=1, n_layers=None):
    cfg = from_hf_config(folder, dtype="float32", n_layers=n_layers)
    mesh = tp_lib.make_mesh(tp)
    gen = Generator(*tp_lib.load_weights(cfg, mesh, folder), mesh)
    tokens = np.arange(1, 9, dtype=np.int32).reshape(1, 8)
    out = gen.forward(gen.params, tp_lib.replicated(tokens, mesh), tp_lib.replicated(np.zeros(1, np.int32), mesh))
    return np.asarray(out)


def test_sharded_checkpoint_with_index_equals_single_file(tmp_path):
    tensors = fixture_tensors()
    names = sorted(tensors)
    folder = tmp_path / "sharded"
    folder.mkdir()
    shutil.copy(os.path.join(TINY, "config.json"), folder / "config.json")
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in parts.items():
        write_safetensors(folder / file, {n: tensors[n] for n in part})
    weight_map = {n: file for file, part in parts.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    np.testing.assert_array_equal(logits(str(folder), tp=2), logits(TINY, tp=2))


def test_layer_override_reads_a_prefix_of_the_layers(tmp_path):
    tensors = {k: v for k, v in fixture_tensors().items() if ".layers.1." not in k}
    folder = copy_checkpoint(tmp_path, tensors)
    with pytest.raises(ValueError, match="model.layers.1.input_layernorm.weight"):
        logits(folder)
    assert logits(folder, n_layers=1).shape == (1, 8, 256)


def test_hf_layout():
    assert hf_layout((64, 8, 16), ("embed", "heads", "head_dim")) == ((128, 64), True)
    assert hf_layout((8, 16, 64), ("heads", "head_dim", "embed")) == ((64, 128), True)
    assert hf_layout((256, 64), ("vocab", "embed")) == ((256, 64), False)


# ---------------------------------------------------------------------------------------- errors
def test_missing_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="does-not-exist"):
        from_hf_config(str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError, match="does not exist"):
        Checkpoint(str(tmp_path / "does-not-exist"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        Checkpoint(str(tmp_path))


@pytest.mark.parametrize("text,match", [("{not json", "malformed config"), ("[1, 2]", "JSON object"),
                                        ('{"hidden_size": 64}', "missing field"),
                                        ('{"model_type": "mistral"}', "'mistral'")])
def test_malformed_config(tmp_path, text, match):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match):
        from_hf_config(str(tmp_path))


def test_malformed_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than"):
        SafetensorsFile(str(path))
    path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ValueError, match="exceeds the file size"):
        SafetensorsFile(str(path))
    path.write_bytes(struct.pack("<Q", 5) + b"{oops")
    with pytest.raises(ValueError, match="malformed safetensors"):
        SafetensorsFile(str(path))
    write_safetensors(path, {"w": np.zeros((4, 4), np.float32)})
    path.write_bytes(path.read_bytes()[:-8])  # truncated data
    with pytest.raises(ValueError, match="'w' data_offsets"):
        SafetensorsFile(str(path))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    folder = copy_checkpoint(tmp_path, config_changes={"intermediate_size": 96})
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.weight' has shape \[64, 128\], "
                                         r"but the config implies \[64, 96\]"):
        logits(folder)


def test_missing_lm_head_when_untied(tmp_path):
    tensors = {k: v for k, v in fixture_tensors().items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="'lm_head.weight'"):
        logits(copy_checkpoint(tmp_path, tensors))


def test_index_naming_a_missing_file(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00009.safetensors"}}))
    with pytest.raises(ValueError, match="model-00009.safetensors"):
        Checkpoint(folder)


def test_tokenizer_when_present():
    pytest.importorskip("tokenizers")
    assert load_tokenizer(TINY) is None
    tok = load_tokenizer(TIED)
    ids = tok.encode("hello world").ids
    assert len(ids) == 11 and max(ids) < 256
    assert tok.decode(ids) == "hello world"
