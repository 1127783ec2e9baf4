"""convert/: the safetensors reader and the strict name/layout table, on small synthetic tensors."""
import json
import struct

import numpy as np
import pytest

from convert import diffusers_layout as dl
from convert.formats import TensorFileError, read_safetensors, read_tensors, write_safetensors
from jaxdiff.errors import CheckpointError


def _target():
    shape = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    return {
        "conv_in": {"kernel": shape(3, 3, 4, 8), "bias": shape(8)},
        "down_blocks_0": {"resnets_1": {"norm1": {"scale": shape(8), "bias": shape(8)}}},
        "time_embedding": {"linear_1": {"kernel": shape(8, 16), "bias": shape(16)}},
        "emb": {"embedding": shape(10, 8)},
    }


def _source():
    rng = np.random.default_rng(0)
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {
        "conv_in.weight": r(8, 4, 3, 3), "conv_in.bias": r(8),
        "down_blocks.0.resnets.1.norm1.weight": r(8), "down_blocks.0.resnets.1.norm1.bias": r(8),
        "time_embedding.linear_1.weight": r(16, 8), "time_embedding.linear_1.bias": r(16),
        "emb.weight": r(10, 8),
    }


def test_key_rule_joins_indices_only():
    assert dl.source_key_to_path("down_blocks.0.resnets.1.conv1.weight") == (
        "down_blocks_0", "resnets_1", "conv1", "weight")
    assert dl.source_key_to_path("ff.net.0.proj.bias") == ("ff", "net_0", "proj", "bias")
    assert dl.source_key_to_path("time_embedding.linear_1.weight") == ("time_embedding", "linear_1", "weight")


def test_convert_transposes_and_fills_every_param():
    src = _source()
    out = dl.convert_state_dict(src, _target())
    np.testing.assert_array_equal(out["conv_in"]["kernel"], src["conv_in.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["time_embedding"]["linear_1"]["kernel"],
                                  src["time_embedding.linear_1.weight"].T)
    np.testing.assert_array_equal(out["emb"]["embedding"], src["emb.weight"])
    np.testing.assert_array_equal(out["down_blocks_0"]["resnets_1"]["norm1"]["scale"],
                                  src["down_blocks.0.resnets.1.norm1.weight"])
    assert set(dl.flatten(out)) == set(dl.flatten(_target()))


@pytest.mark.parametrize("edit, word", [
    (lambda s: s.pop("conv_in.bias"), "1 missing (conv_in/bias)"),
    (lambda s: s.update({"extra.weight": np.zeros(3, np.float32)}), "1 left over (extra.weight)"),
    (lambda s: s.update({"conv_in.bias": np.zeros(9, np.float32)}), "1 mis-shaped (conv_in.bias"),
])
def test_mismatch_is_listed(edit, word):
    src = _source()
    edit(src)
    with pytest.raises(CheckpointError, match="unet/x.safetensors") as e:
        dl.convert_state_dict(src, _target(), source="unet/x.safetensors")
    assert word in str(e.value)
    assert "\n" not in str(e.value)


def test_ignore_patterns_drop_buffers():
    src = _source() | {"text_model.embeddings.position_ids": np.arange(3)}
    out = dl.convert_state_dict(src, _target(), ignore=("*.position_ids",))
    assert set(dl.flatten(out)) == set(dl.flatten(_target()))
    with pytest.raises(CheckpointError, match="left over"):  # without the pattern the buffer is an error
        dl.convert_state_dict(src, _target())


def test_safetensors_roundtrip_matches_reference_library(tmp_path):
    import ml_dtypes
    from safetensors.numpy import load_file, save_file
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2,), np.float16),
               "c": np.arange(5, dtype=np.int64)}
    save_file(tensors, tmp_path / "ref.safetensors")
    got = read_safetensors(tmp_path / "ref.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype
    # Our writer's file reads back in the reference library, bfloat16 included.
    ours = tensors | {"d": np.array([1.5, -2, 3], ml_dtypes.bfloat16)}
    write_safetensors(tmp_path / "ours.safetensors", ours)
    back = load_file(tmp_path / "ours.safetensors")
    for k, v in ours.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype


def test_truncated_and_hostile_files_fail_with_the_file_name(tmp_path):
    good = tmp_path / "m.safetensors"
    write_safetensors(good, {"w": np.ones((64, 64), np.float32)})
    blob = good.read_bytes()
    cases = {
        "trunc.safetensors": blob[:-100],
        "tiny.safetensors": blob[:5],
        "hugeheader.safetensors": struct.pack("<Q", 1 << 40) + blob[8:],
        "badjson.safetensors": struct.pack("<Q", 4) + b"{{{{",
        "badoffsets.safetensors": _with_header({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, 16),
        "overlap.safetensors": _with_header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 16),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(TensorFileError, match=name):
            read_tensors(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        read_tensors(tmp_path / "absent.safetensors")


def _with_header(header, data_bytes):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + b"\0" * data_bytes


def test_sharded_index(tmp_path):
    write_safetensors(tmp_path / "m-1.safetensors", {"a": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "m-2.safetensors", {"b": np.zeros(3, np.float32)})
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    got = read_tensors(index)
    assert set(got) == {"a", "b"} and got["b"].shape == (3,)
    index.write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "c": "m-2.safetensors"}}))
    with pytest.raises(TensorFileError, match="not in their shards"):
        read_tensors(index)
