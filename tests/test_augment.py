"""Augmented training views and the robustness perturbations: deterministic, never cutting an
object, and a mirrored view's captions rewritten so that they still describe it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import encode_caption
from training.data.augment import (
    CANVAS,
    PERTURBATIONS,
    AugmentConfig,
    augmented_view,
    mirror_ids,
    mirror_tokens,
    objects_box,
    perturb,
    rng_for,
    zoom_window,
)
from training.data.synthetic import (
    content_breakdown,
    content_correct,
    draw_scene,
    make_captions,
    make_scene,
)


def scene_and_image(index: int, side: int = 200):
    rng = np.random.default_rng([7, index])
    scene = make_scene(rng, side, 1 + index % 2)
    return scene, draw_scene(scene, side, rng)


def test_a_view_is_a_function_of_seed_image_and_index():
    scene, image = scene_and_image(1)
    cfg = AugmentConfig()
    keep = objects_box(scene)
    first, flipped = augmented_view(image, cfg, rng_for(0, "a.png", 0), keep)
    again, flipped_again = augmented_view(image, cfg, rng_for(0, "a.png", 0), keep)
    assert np.array_equal(np.asarray(first), np.asarray(again)) and flipped == flipped_again
    assert first.size == image.size
    others = [
        augmented_view(image, cfg, rng_for(*key), keep)[0]
        for key in ((1, "a.png", 0), (0, "b.png", 0), (0, "a.png", 1))
    ]
    for other in others:
        assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_about_half_the_views_are_mirrored_and_none_when_flip_is_zero():
    _, image = scene_and_image(2)
    flips = [augmented_view(image, AugmentConfig(), rng_for(0, "x", k))[1] for k in range(60)]
    assert 15 < sum(flips) < 45
    never = AugmentConfig(flip=0.0)
    assert not any(augmented_view(image, never, rng_for(0, "x", k))[1] for k in range(20))


def test_a_zoomed_window_never_cuts_an_object_and_a_crop_stays_on_the_image():
    rng = np.random.default_rng(0)
    for index in range(300):
        scene, _ = scene_and_image(index)
        keep = objects_box(scene)
        zoom = float(rng.uniform(0.5, 2.5))
        x0, y0, x1, y1 = zoom_window((200, 200), zoom, rng.uniform(-0.3, 0.3, 2), keep)
        assert x0 <= keep[0] and y0 <= keep[1] and x1 >= keep[2] and y1 >= keep[3]
        if zoom > 1:
            assert x0 >= 0 and y0 >= 0 and x1 <= 200 + 1e-9 and y1 <= 200 + 1e-9
        # without a scene (a photo), a crop stays inside the image
        x0, y0, x1, y1 = zoom_window((300, 200), 1.3, rng.uniform(-0.3, 0.3, 2), None)
        assert x0 >= 0 and y0 >= 0 and x1 <= 300 + 1e-9 and y1 <= 200 + 1e-9
        assert x1 - x0 == pytest.approx(300 / 1.3) and y1 - y0 == pytest.approx(200 / 1.3)


def test_mirrored_captions_describe_the_mirrored_scene(tokenizer):
    left, right = mirror_ids("packaged")
    assert tokenizer.convert_ids_to_tokens([left, right]) == ["left", "right"]
    rng = np.random.default_rng(3)
    checked = 0
    for _ in range(400):
        scene = make_scene(rng, 224, 2)
        for caption in make_captions(scene, rng):
            ids = torch.tensor(encode_caption(tokenizer, caption))
            text = tokenizer.decode(mirror_tokens(ids, left, right), skip_special_tokens=True)
            assert content_correct(text, scene.mirrored()), (caption, text, scene)
            if scene.relation in ("left of", "right of"):
                assert not content_correct(text, scene)  # the rewrite did change its meaning
                checked += 1
            else:
                assert text == caption  # above/below: nothing to swap
    assert checked > 500
    array = np.array([101, left, 7, right, right, 102])
    assert mirror_tokens(array, left, right).tolist() == [101, right, 7, left, left, 102]


def test_perturbed_copies(tokenizer):
    scene, image = scene_and_image(5, side=240)
    assert scene.relation is not None
    for k, name in enumerate(PERTURBATIONS):
        copy, shown = perturb(name, image, scene, rng_for(0, "t.png", 1000 + k))
        again, _ = perturb(name, image, scene, rng_for(0, "t.png", 1000 + k))
        assert np.array_equal(np.asarray(copy), np.asarray(again)), name
        assert copy.mode == "RGB" and copy.width == copy.height
        assert not np.array_equal(np.asarray(copy.resize(image.size)), np.asarray(image)), name
        expected = scene.mirrored() if PERTURBATIONS[name] else scene
        assert (shown.objects[0].colour, shown.relation) == (
            expected.objects[0].colour,
            expected.relation,
        )
    assert perturb("downscaled", image, scene, rng_for(0, "t", 0))[0].width == 120
    assert perturb("upscaled", image, scene, rng_for(0, "t", 0))[0].width == 480
    assert perturb("canvas", image, scene, rng_for(0, "t", 0))[0].width == CANVAS
    flipped, shown = perturb("flipped", image, scene, rng_for(0, "t", 0))
    assert np.array_equal(np.asarray(flipped)[:, ::-1], np.asarray(image))
    caption = make_captions(scene, np.random.default_rng(0))[0]
    assert not content_breakdown(caption, shown)["relation"] or scene.relation in ("above", "below")
    with pytest.raises(ValueError, match="unknown perturbation 'rotated'"):
        perturb("rotated", image, scene, rng_for(0, "t", 0))


@pytest.mark.parametrize(
    "values, message",
    [
        ({"zoom": [1.2, 0.8]}, r"zoom must be \[lo, hi\] with 0 < lo <= hi"),
        ({"zoom": 1.2}, r"zoom must be \[lo, hi\], got 1\.2"),
        ({"jpeg_quality": [10, 99]}, r"jpeg_quality must be \[lo, hi\] within 1\.\.95"),
        ({"flip": 1.5}, r"flip is a fraction in \[0, 1\]"),
        ({"blur": -1.0}, r"blur must be >= 0"),
        ({"resolution": 0.0}, r"resolution must be in \(0, 1\]"),
        ({"brightness": 1.0}, r"brightness must be < 1"),
        ({"rotate": 10}, r"unknown transform\.augment key\(s\) \['rotate'\]"),
    ],
)
def test_bad_augment_params_are_errors_naming_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig.from_dict(values)
