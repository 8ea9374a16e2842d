"""Caption metrics (pycocoevalcap) and the synthetic content metric on known answers."""

from __future__ import annotations

import numpy as np
import pytest

from training.data.captions import read_captions
from training.data.synthetic import load_scenes, make_captions, make_scene, write_synthetic
from training.evaluation import metrics
from training.evaluation.metrics import caption_metrics, content_metrics, ptb_tokenize

SCORES = {"bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """12 synthetic images: their scenes and five reference captions each."""
    raw = tmp_path_factory.mktemp("raw")
    write_synthetic(raw, num_images=12, image_size=64, seed=7)
    scenes = load_scenes(raw)
    refs: dict[str, list[str]] = {}
    for row in read_captions(raw):
        refs.setdefault(row.image, []).append(row.caption)
    return scenes, refs


@pytest.mark.java
def test_a_reference_as_prediction_scores_top_and_unrelated_text_scores_near_zero(synthetic):
    _, refs = synthetic
    same = caption_metrics({image: captions[2] for image, captions in refs.items()}, refs)
    assert set(same) == SCORES
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert same[key] == pytest.approx(1.0, abs=1e-6), key
    assert same["meteor"] > 0.9
    assert same["cider"] > 2.0  # CIDEr is tf-idf weighted: up to 10, ~1 is good on COCO

    unrelated = {image: "dogs jumping into lakes after sticks" for image in refs}
    low = caption_metrics(unrelated, refs)
    assert low["bleu1"] < 0.1 and low["meteor"] < 0.1 and low["cider"] < 0.1
    for key in SCORES - {"cider"}:
        assert 0.0 <= low[key] <= same[key] <= 1.0, key


@pytest.mark.java
def test_metrics_ignore_case_and_punctuation_as_coco_does(synthetic):
    _, refs = synthetic
    shouted = {image: captions[0].upper() + "." for image, captions in refs.items()}
    assert caption_metrics(shouted, refs)["bleu4"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.java
def test_ptb_tokenize_keeps_one_line_per_caption():
    tokens = ptb_tokenize(
        {"a": ["A Red circle, left of a blue square.", ""], "b": ["two\nlines", "x ||| y"]}
    )
    assert tokens == {
        "a": ["a red circle left of a blue square", ""],
        "b": ["two lines", "x | | | y"],
    }


def test_bad_input_is_an_actionable_error(monkeypatch):
    with pytest.raises(ValueError, match="no predictions"):
        caption_metrics({}, {"a": ["x"]})
    with pytest.raises(ValueError, match="have no reference captions.*'b'"):
        caption_metrics({"a": "x", "b": "y"}, {"a": ["x"]})
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="`java` is not on PATH.*apt-get install"):
        caption_metrics({"a": "x"}, {"a": ["x"]})


def test_content_accuracy_is_one_for_reference_captions(synthetic):
    scenes, refs = synthetic
    for k in range(5):  # every wording the dataset uses
        rates, flags = content_metrics({image: caps[k] for image, caps in refs.items()}, scenes)
        assert rates["content_accuracy"] == 1.0
        for key in ("objects", "colour", "shape", "count", "relation"):
            assert rates[f"{key}_accuracy"] == 1.0, key
        assert rates.get("size_accuracy", 1.0) == 1.0
        assert all(f["correct"] for f in flags.values())


def test_content_breakdown_rates_count_what_is_wrong():
    rng = np.random.default_rng(0)
    one = [make_scene(rng, 64, 1) for _ in range(2)]
    two = [make_scene(rng, 64, 2) for _ in range(2)]
    scenes = dict(zip(["o1", "o2", "t1", "t2"], one + two))
    a, b = two[0].objects
    right = make_captions(two[1], rng)[0]
    predictions = {
        "o1": make_captions(one[0], rng)[0],  # right
        "o2": "a picture of nothing",  # no object
        "t1": f"a {a.colour} {a.shape} {'below' if two[0].relation == 'above' else 'above'} "
        f"a {b.colour} {b.shape}",  # objects right, relation wrong (or unstated as above/below)
        "t2": right,  # right
    }
    rates, flags = content_metrics(predictions, scenes)
    assert [flags[i]["correct"] for i in scenes] == [True, False, False, True]
    assert rates["content_accuracy"] == 0.5
    assert rates["objects_accuracy"] == 0.75
    assert rates["relation_accuracy"] == 0.5  # over the two two-object scenes only
    with pytest.raises(ValueError, match="not in scenes.json"):
        content_metrics({"zzz.png": "a red circle"}, scenes)
