"""convert.pickle_reader against torch.load of files written by torch.save, and hostile pickles."""
from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch

from convert.errors import CheckpointError
from convert.pickle_reader import load_pickle, read_pickle_checkpoint, read_pickle_state_dict


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same(ours: np.ndarray, ref: torch.Tensor):
    ref_np = _np(ref)
    assert ours.dtype == ref_np.dtype and ours.shape == ref_np.shape
    np.testing.assert_array_equal(ours.view(np.uint8) if ours.dtype == ml_dtypes.bfloat16 else ours,
                                  ref_np.view(np.uint8) if ref_np.dtype == ml_dtypes.bfloat16 else ref_np)


def test_dtypes_views_and_shared_storages_match_torch_load(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    sd = OrderedDict(
        f32=torch.randn(3, 4, generator=g),
        f16=torch.randn(7, generator=g).half(),
        bf16=torch.randn(2, 3, 4, generator=g).bfloat16(),
        i64=torch.arange(10),
        scalar=torch.tensor(3.5),
        base=base,
        view_rows=base[2:5],          # offset into a shared storage
        view_t=base.t(),              # strides, not contiguous
        view_slice=base[:, 1::2],     # strided columns
        tied=base,                    # the same tensor twice
        param=torch.nn.Parameter(torch.randn(4, 4, generator=g)),
        empty=torch.zeros(0, 3),
    )
    path = tmp_path / "mixed.pt"
    torch.save(sd, path)
    ref = torch.load(path, weights_only=True)
    ours = load_pickle(path)
    assert list(ours) == list(ref)
    for k in ref:
        _assert_same(ours[k], ref[k])
    # Views of one storage share memory, as they do in torch.
    assert np.shares_memory(ours["view_rows"], ours["base"]) and np.shares_memory(ours["tied"], ours["base"])
    # Lazily read (contiguous tensors stay in the file until np.asarray), the same values.
    lazy, _ = read_pickle_checkpoint(path, lazy=True)
    assert set(lazy) == set(ref)
    assert type(lazy["f32"]).__name__ == "LazyTensor" and type(lazy["view_t"]) is not type(lazy["f32"])
    for k in ref:
        _assert_same(np.asarray(lazy[k]), ref[k])


def test_legacy_format_matches_torch_load(tmp_path):
    """torch < 1.6's non-zip format (consecutive pickles, storages after the object)."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 4, generator=g)
    sd = {"f32": torch.randn(3, 2, generator=g), "f16": torch.randn(6, generator=g).half(),
          "bf16": torch.randn(2, 2, generator=g).bfloat16(), "view_t": base.t(), "rows": base[1:3], "base": base,
          "nested": {"x": torch.arange(4)}}
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd, "global_step": 7}, path, _use_new_zipfile_serialization=False)
    ref = torch.load(path, weights_only=True)["state_dict"]
    tensors, info = read_pickle_checkpoint(path)
    assert info["global_step"] == 7 and set(tensors) == set(ref) - {"nested"}
    for k in tensors:
        _assert_same(tensors[k], ref[k])


def test_lightning_wrapper_and_flat_state_dict(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=g),
          "first_stage_model.quant_conv.bias": torch.randn(8, generator=g).half()}
    wrapped = {"state_dict": sd, "global_step": 470000, "epoch": 3, "optimizer_states": [],
               "hyper_parameters": {"lr": 1e-4}, "callbacks": {"x": np.int64(5)}}
    for name, obj in (("lightning.ckpt", wrapped), ("flat.ckpt", sd)):
        torch.save(obj, tmp_path / name)
        got = read_pickle_state_dict(tmp_path / name)
        assert set(got) == set(sd)
        for k in sd:
            _assert_same(got[k], sd[k])


def _torch_like_zip(path, payload: bytes):
    """A zip laid out as torch.save writes it, with `payload` as data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", payload)
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/version", "3\n")


def _call_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol-2 opcodes for `module.name(arg)` (GLOBAL, the args tuple, REDUCE, STOP)."""
    return b"\x80\x02" + f"c{module}\n{name}\n".encode() + pickle.dumps((arg,), 2)[2:-1] + b"R."


def _payload(module: str, name: str, marker) -> bytes:
    code = f"open({str(marker)!r}, 'w').write('x')"
    return _call_pickle(module, name, code if name in ("exec", "eval") else f"touch {marker}")


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "exec"),
                                         ("builtins", "eval"), ("subprocess", "getoutput")])
def test_hostile_pickle_refused_and_never_runs(tmp_path, module, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.ckpt"
    _torch_like_zip(path, _payload(module, name, marker))
    with pytest.raises(CheckpointError) as e:
        read_pickle_state_dict(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"{module}.{name}" in msg
    assert not marker.exists()


def test_hostile_legacy_format_pickle_refused(tmp_path):
    marker = tmp_path / "pwned"
    head = b"".join(pickle.dumps(x, 2) for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}))
    path = tmp_path / "legacy_hostile.pt"
    path.write_bytes(head + _payload("os", "system", marker))
    with pytest.raises(CheckpointError, match="os.system") as e:
        read_pickle_state_dict(path)
    assert "\n" not in str(e.value) and not marker.exists()


def test_hostile_payload_is_real(tmp_path):
    """The same opcodes do run under plain pickle, so the refusal above is what protects."""
    marker = tmp_path / "ran"
    pickle.loads(_payload("builtins", "exec", marker))
    assert marker.exists()


def test_truncated_and_foreign_files_give_one_line(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.pt")
    raw = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "text.ckpt").write_text("hello")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "legacy_cut.pt").write_bytes((tmp_path / "legacy.pt").read_bytes()[:-100])
    for name in ("cut.pt", "text.ckpt", "legacy_cut.pt", "missing.ckpt"):
        with pytest.raises(CheckpointError) as e:
            read_pickle_state_dict(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
