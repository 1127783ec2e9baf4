"""Data: folder layouts, transforms, caption dropout rate, disjoint host shards, one visit per epoch,
deterministic restart from a saved position, latent cache, synthetic mode. Pure numpy: no compiles."""
import json

import numpy as np
import pytest
from PIL import Image

from jaxdiff.training import data as D


def _images(root, n=10, size=(24, 16)):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    return root


def test_folder_layouts(tmp_path):
    a = _images(tmp_path / "jsonl", 3)
    (a / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"cap {i}"})
                                                for i in range(3)))
    assert [c for _, c in D.scan_folder(a)] == ["cap 0", "cap 1", "cap 2"]
    b = _images(tmp_path / "csv", 2)
    (b / "metadata.csv").write_text("file_name,prompt\n00.png,hello\n01.png,\"a, b\"\n")
    assert [c for _, c in D.scan_folder(b, D.DataConfig(caption_column="prompt"))] == ["hello", "a, b"]
    c = _images(tmp_path / "txt", 2)
    (c / "00.txt").write_text("side caption\n")
    assert [cap for _, cap in D.scan_folder(c)] == ["side caption", ""]
    with pytest.raises(D.DataError, match="missing"):
        (a / "metadata.jsonl").write_text(json.dumps({"file_name": "nope.png", "text": "x"}))
        D.scan_folder(a)
    with pytest.raises(D.DataError, match="no images"):
        (tmp_path / "empty").mkdir()
        D.scan_folder(tmp_path / "empty")


def test_transforms(tmp_path):
    root = tmp_path / "one"
    root.mkdir()
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, :12] = 255  # left half white
    Image.fromarray(img).save(root / "a.png")
    path = root / "a.png"
    center = D.load_image(path, D.DataConfig(resolution=8), np.random.default_rng(0))
    assert center.shape == (8, 8, 3) and center.dtype == np.float32
    assert center.min() >= -1 and center.max() <= 1
    assert center[:, 0].mean() > 0.9 and center[:, -1].mean() < -0.9  # crop keeps the middle
    flips = [D.load_image(path, D.DataConfig(resolution=8, random_flip=True), np.random.default_rng(s))
             for s in range(40)]
    flipped = sum(f[:, 0].mean() < 0 for f in flips)
    assert 10 <= flipped <= 30  # p = 0.5
    crops = {D.load_image(path, D.DataConfig(resolution=8, center_crop=False),
                          np.random.default_rng(s))[:, :, 0].sum().round(3) for s in range(20)}
    assert len(crops) > 1  # random crop moves


def test_caption_dropout_rate(tmp_path):
    root = _images(tmp_path / "d", 4, (8, 8))
    for i in range(4):
        (root / f"{i:02d}.txt").write_text("x")
    ds = D.ImageFolder(root, D.DataConfig(resolution=8, caption_dropout=0.25))
    dropped = np.mean([ds.get(i % 4, D.sample_rng(0, e, i % 4))["caption"] == "" for e in range(100)
                       for i in range(4)])
    assert 0.19 <= dropped <= 0.31


def test_hosts_disjoint_epoch_once_and_restart():
    ds = D.Synthetic(12, (2, 2, 4), (3, 8))
    loaders = [D.Loader(ds, global_batch=4, seed=5, process_index=p, process_count=2) for p in range(2)]
    seen = []
    for _ in range(3):  # one epoch = 12 // 4 batches
        rows = [ld.local_indices() for ld in loaders]
        assert not set(rows[0]) & set(rows[1])
        seen += list(rows[0]) + list(rows[1])
        for ld in loaders:
            next(ld)
    assert sorted(seen) == list(range(12))
    assert loaders[0].state() == {"epoch": 1, "position": 0, "seed": 5}
    # epoch 1 has a different order, the same for every host
    assert not np.array_equal(loaders[0].order(0), loaders[0].order(1))
    # restart: a fresh loader restored from a saved position replays the same batches
    ref = D.Loader(ds, global_batch=4, seed=5, process_index=0, process_count=1)
    for _ in range(4):
        next(ref)
    saved = ref.state()
    want = [next(ref)["latents"] for _ in range(3)]
    again = D.Loader(ds, global_batch=4, seed=5, process_index=0, process_count=1)
    again.restore(saved)
    for w in want:
        np.testing.assert_array_equal(next(again)["latents"], w)


def test_loader_tokenizes_and_caches(tmp_path):
    root = _images(tmp_path / "c", 4, (8, 8))
    (root / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i:02d}.png", "text": f"t{i}"})
                                                   for i in range(4)))
    folder = D.ImageFolder(root, D.DataConfig(resolution=8))
    tok = lambda caps: {"input_ids": np.array([[len(c)] * 3 for c in caps], np.int32)}  # noqa: E731
    batch = next(D.Loader(folder, global_batch=2, tokenize=tok, process_index=0, process_count=1))
    assert batch["pixels"].shape == (2, 8, 8, 3) and batch["input_ids"].shape == (2, 3)
    cache = D.cache_dataset(folder, tmp_path / "cache", batch_size=3,
                            encode_images=lambda px: np.concatenate([px[:, ::2, ::2, :2]] * 4, -1),
                            encode_text=lambda caps: np.full((len(caps), 5, 6), float(len(caps[0]))))
    cached = D.Cached(cache, caption_dropout=0.0)
    assert len(cached) == 4
    s = cached.get(1, D.sample_rng(0, 0, 1))
    assert s["moments"].shape == (4, 4, 8) and s["context"].shape == (5, 6)
    np.testing.assert_array_equal(s["context"], 2.0)  # "t1"
    with pytest.raises(D.DataError):
        D.Cached(tmp_path / "nope")
