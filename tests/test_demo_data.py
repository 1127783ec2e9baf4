"""The demo model's data: the synthetic shapes generator and the analytic detector (numpy only, fast)."""
import numpy as np
import pytest

from jaxdiff.demo import detector, shapes


def test_dataset_is_a_function_of_the_seed():
    a_img, a_cap, a_sc = shapes.make_dataset(3, 40)
    b_img, b_cap, b_sc = shapes.make_dataset(3, 40)
    c_img, c_cap, _ = shapes.make_dataset(4, 40)
    assert a_img.shape == (40, 64, 64, 3) and a_img.dtype == np.uint8
    np.testing.assert_array_equal(a_img, b_img)
    assert a_cap == b_cap and a_sc == b_sc
    assert a_cap != c_cap and not np.array_equal(a_img, c_img)
    # A prefix of a longer draw is the shorter draw: n does not reshuffle the stream.
    np.testing.assert_array_equal(shapes.make_dataset(3, 10)[0], a_img[:10])


def test_captions_say_what_is_drawn():
    images, captions, scenes = shapes.make_dataset(0, 200)
    for img, cap, sc in zip(images, captions, scenes):
        assert cap == (f"a {sc.size} {sc.color} {sc.shape} {shapes.POSITIONS[sc.position][1]} "
                       f"on a {sc.background} background")
        assert sc.color != sc.background
        # Pixels far from the shape are exactly the background colour; the shape's centre is its colour.
        assert tuple(img[0, 0]) == shapes.PALETTE[sc.background] or tuple(img[-1, -1]) == shapes.PALETTE[sc.background]
        cx, cy = int(sc.cx * 64), int(sc.cy * 64)
        assert tuple(img[cy, cx]) == shapes.PALETTE[sc.color], cap
        # The measured centroid of the shape pixels is the scene's centroid (the caption's position).
        mask = np.all(img == np.asarray(shapes.PALETTE[sc.color], np.uint8), axis=-1)
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() + 0.5 - sc.cx * 64) < 1.5 and abs(ys.mean() + 0.5 - sc.cy * 64) < 1.5, cap
        lo, hi = shapes.SIZES[sc.size]
        assert lo / 64 <= sc.side <= hi / 64
    # Every attribute value occurs.
    for attr, values in (("shape", shapes.SHAPES), ("color", shapes.COLORS), ("background", shapes.BACKGROUNDS),
                         ("position", tuple(shapes.POSITIONS)), ("size", tuple(shapes.SIZES))):
        assert {getattr(s, attr) for s in scenes} == set(values), attr


def test_held_out_triples_never_reach_training():
    held = shapes.held_out_triples(0)
    assert len(held) == round(shapes.HELDOUT_FRACTION * len(shapes.all_triples()))
    assert held == shapes.held_out_triples(0) and held != shapes.held_out_triples(1)
    _, _, train = shapes.make_dataset(0, 2000, split="train")
    _, _, test = shapes.make_dataset(0, 300, split="heldout")
    assert not {s.triple for s in train} & held
    assert {s.triple for s in test} <= held
    # Each held-out triple's parts are all seen in training, in other combinations.
    seen = {s.triple for s in train}
    for c, sh, p in held:
        assert any(t[0] == c and t[1] == sh for t in seen) and any(t[2] == p for t in seen)
    with pytest.raises(ValueError):
        shapes.make_dataset(0, 1, split="validation")


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_detector_reads_ground_truth(split):
    images, _, scenes = shapes.make_dataset(5, 150, split=split)
    scores = detector.score([detector.detect(img) for img in images], scenes)
    for attr in ("color", "shape", "position", "background", "size"):
        assert scores[attr] >= 0.98, (attr, scores)


def test_detector_is_not_fooled():
    """Wrong answers are possible: a blank image has no shape, a swapped colour is read as such."""
    blank = np.full((64, 64, 3), shapes.PALETTE["gray"], np.uint8)
    d = detector.detect(blank)
    assert d.shape is None and d.color is None and d.background == "gray"
    import dataclasses
    sc = shapes.Scene("circle", "red", "white", "top left", "large", 0.25, 0.25, 26 / 64)
    for change in ({"shape": "square"}, {"shape": "triangle"}, {"shape": "diamond"}, {"color": "orange"},
                   {"position": "bottom right", "cx": 0.75, "cy": 0.75}, {"background": "black"}):
        other = dataclasses.replace(sc, **change)
        got = detector.detect(shapes.render(other))
        for attr in change:
            if attr in ("shape", "color", "position", "background"):
                assert getattr(got, attr) == getattr(other, attr) != getattr(sc, attr)


def test_caption_variants_leave_out_size_and_position():
    scene = shapes.Scene("circle", "red", "blue", "top left", "small", 0.25, 0.25, 0.3)
    assert shapes.caption(scene) == "a small red circle in the top left on a blue background"
    assert shapes.caption(scene, size=False) == "a red circle in the top left on a blue background"
    assert shapes.caption(scene, position=False) == "a small red circle on a blue background"
    assert shapes.caption(scene, size=False, position=False) == "a red circle on a blue background"
