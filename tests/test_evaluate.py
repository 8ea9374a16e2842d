"""The evaluate stage end to end on a tiny synthetic dataset, a tiny model and a tmp MLflow store.

The model is overfitted on a chosen caption for each test image: four describe their scene,
two do not, so content accuracy lies strictly between 0 and 1 and the grid shows both colours.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import socket
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageColor

from model import (
    Captioner,
    decode_caption,
    encode_caption,
    load,
    load_checkpoint,
    normalize_caption,
    open_image,
    preset,
    save_checkpoint,
)
from tests.helpers.marks import needs
from tests.helpers.model import caption_tokens, fit
from training.data.augment import PERTURBATIONS
from training.data.captions import SCENES_FILE, read_captions
from training.data.synthetic import content_correct, load_scenes, write_synthetic
from training.evaluation import attention_plot, samples
from training.evaluation.metrics import warm_up
from training.evaluation.samples import grid_size
from training.stages.evaluate import EvalPaths, EvaluateConfig, evaluate
from training.stages.transform import TransformConfig, transform
from training.tracking import publish as publish_module
from training.tracking import registry
from training.tracking import runs as tracking
from training.tracking.model_card import retitle
from training.tracking.publish import Evaluated, publish
from training.tracking.registry import Registered

PARAMS = {
    "num_beams": 2,
    "max_length": 20,
    "length_penalty": 1.0,
    "batch_size": 4,
    "grid_images": 6,
}
CORRECT = 4  # test images trained on a caption that describes them; the other two get a wrong one


@contextlib.contextmanager
def mlflow_store(mp: pytest.MonkeyPatch, uri: str):
    """Point MLflow at `uri` for the duration (env var and the process-wide setting)."""
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # unset: the next test's environment decides


@contextlib.contextmanager
def tracking_off(ws):
    """MLflow pointed at a port nothing listens on (yielded), then back at the workspace's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mlflow_store(ws["mp"], f"http://127.0.0.1:{port}"):
        yield port
    ws["mp"].setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws['root'] / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{ws['root'] / 'mlflow.db'}")


def memorise(model: Captioner, grid: torch.Tensor, captions: list[str], tokenizer) -> None:
    """Overfit the model towards grid[i] -> captions[i] (not to perfection: a few seconds)."""
    tokens = caption_tokens(tokenizer, captions, max_tokens=PARAMS["max_length"] + 1)  # (B, T)
    fit(model, grid, tokens, lr=1e-2, steps=120)


def run_evaluate(root: Path, raw: Path, out: Path, params: dict, features: Path | None = None):
    """The evaluate stage on the workspace under `root` (model/, processed/, features/), writing
    eval.json, predictions.jsonl, samples.png and model_card.md into `out`."""
    paths = EvalPaths(
        model=root / "model" / "model.pth",
        processed=root / "processed" / "captions.json",
        features=features or root / "features",
        raw=raw,
        metrics=out / "eval.json",
        predictions=out / "predictions.jsonl",
        robustness=out / "robustness.jsonl",
        samples=out / "samples.png",
        attention=out / "attention.png",
        card=out / "model_card.md",
    )
    return evaluate(EvaluateConfig.from_dict(params), paths)


def run_track(root: Path, raw: Path, out: Path) -> Registered:
    """The track stage on what run_evaluate wrote into `out` (training/tracking/publish.py)."""
    files = ("eval.json", "predictions.jsonl", "samples.png", "attention.png", "robustness.jsonl")
    evaluated = Evaluated(
        model=root / "model" / "model.pth",
        metrics=out / "eval.json",
        card=out / "model_card.md",
        processed=root / "processed" / "captions.json",
        raw=raw,
        history=root / "model" / "train_history.csv",
        run_file=root / "model" / "mlflow.json",
        files=tuple(out / name for name in files),
    )
    return publish(evaluated, {"evaluate": PARAMS})


@pytest.fixture(scope="module")
@needs("java")  # METEOR
def ws(tmp_path_factory, tokenizer):
    """A workspace after `evaluate`: inputs, outputs, the model and the MLflow run id."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: two threads only spin against each other
    warm_up()  # METEOR's JVM loads on the other core while the model trains
    root = tmp_path_factory.mktemp("evaluate")
    raw = root / "raw"
    write_synthetic(raw, num_images=10, image_size=64, seed=3)
    scenes = load_scenes(raw)
    refs: dict[str, list[str]] = {}
    for row in read_captions(raw):
        refs.setdefault(row.image, []).append(normalize_caption(row.caption))
    images = sorted(refs)
    splits = {"train": images[:3], "val": images[3:4], "test": images[4:]}
    processed = root / "processed" / "captions.json"
    processed.parent.mkdir()
    entry = lambda i: {  # noqa: E731
        "image": i,
        "captions": refs[i],
        "tokens": [encode_caption(tokenizer, c, 32) for c in refs[i]],
    }
    processed.write_text(
        json.dumps(
            {
                "tokenizer": "packaged",
                "max_tokens": 32,
                "splits": {s: [entry(i) for i in v] for s, v in splits.items()},
            }
        )
    )
    # The tiny encoder is random: the same seed gives transform's encoder and the model's the
    # same weights (checked below), as a pretrained encoder's weights would be.
    torch.manual_seed(0)
    transform(
        TransformConfig(device="cpu", batch_size=4), "tiny", raw, processed, root / "features"
    )
    torch.manual_seed(0)
    model = Captioner(preset("tiny"))

    test = splits["test"]
    grid = torch.from_numpy(np.load(root / "features" / "test.npy")).float()  # (6, 16, 32)
    pixels = torch.stack([model.preprocess(open_image(raw / "Images" / i)) for i in test])
    assert torch.allclose(model.encode_image(pixels), grid, atol=1e-2, rtol=1e-2)
    wrong = [min(refs[i], key=len) for i in splits["train"][:2]]  # captions of other images
    assert not any(content_correct(c, scenes[i]) for c, i in zip(wrong, test[CORRECT:]))
    targets = [min(refs[i], key=len) for i in test[:CORRECT]] + wrong  # short: fast to learn
    memorise(model, grid, targets, tokenizer)
    model_dir = root / "model"
    model_dir.mkdir()
    save_checkpoint(model, model_dir / "model.pth")

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default artifact location is relative to the working dir
        with mlflow_store(mp, f"sqlite:///{root / 'mlflow.db'}"):
            tracking.configure()
            with mlflow.start_run(run_name="train") as active:  # what train does
                run_id = active.info.run_id
                mlflow.log_params(tracking.flatten({"evaluate": PARAMS}))
            tracking.save_run_id(run_id, model_dir / "mlflow.json")
            out = root / "out"
            metrics = run_evaluate(root, raw, out, PARAMS)
            registered = run_track(root, raw, out)
            yield {
                "root": root,
                "raw": raw,
                "out": out,
                "metrics": metrics,
                "test": test,
                "targets": targets,
                "refs": refs,
                "scenes": scenes,
                "run_id": run_id,
                "registered": registered,
                "mp": mp,
            }
    torch.set_num_threads(threads)


def read_predictions(ws) -> list[dict]:
    return [json.loads(line) for line in (ws["out"] / "predictions.jsonl").read_text().splitlines()]


def test_predictions_are_what_the_model_generates(ws, tokenizer):
    lines = read_predictions(ws)
    assert [line["image"] for line in lines] == ws["test"]
    model = load_checkpoint(ws["root"] / "model" / "model.pth")
    grid = torch.from_numpy(np.load(ws["root"] / "features" / "test.npy")).float()
    for i, line in enumerate(lines):  # one image at a time: batching must not change a caption
        out = model.generate(grid=grid[i : i + 1], num_beams=2, max_length=20, length_penalty=1.0)
        assert line["caption"] == decode_caption(tokenizer, out.tokens[0])
        assert line["score"] == pytest.approx(out.scores[0], abs=1e-3)
        assert line["references"] == ws["refs"][line["image"]]


def test_content_accuracy_is_the_fraction_of_correct_predictions(ws):
    lines = read_predictions(ws)
    correct = [content_correct(line["caption"], ws["scenes"][line["image"]]) for line in lines]
    assert [line["correct"] for line in lines] == correct
    saved = json.loads((ws["out"] / "eval.json").read_text())
    assert saved == ws["metrics"]
    assert saved["content_accuracy"] == pytest.approx(sum(correct) / len(correct), abs=1e-4)
    assert 0 < saved["content_accuracy"] <= CORRECT / 6 + 1e-4  # the two wrong targets stay wrong
    assert saved["num_images"] == 6
    # metrics only: the decoding settings are params (evaluate.*), not repeated here
    assert not {"num_beams", "max_length", "length_penalty"} & set(saved)
    for key in ("bleu1", "bleu4", "meteor", "rouge_l", "objects_accuracy", "colour_accuracy"):
        assert 0.0 <= saved[key] <= 1.0
    assert saved["bleu1"] > 0.3  # most captions are (nearly) references
    assert saved["decode_seconds"] > 0 and saved["captions_per_second"] > 0


def test_robustness_report_scores_the_captions_of_every_perturbed_copy(ws, tokenizer):
    lines = [json.loads(x) for x in (ws["out"] / "robustness.jsonl").read_text().splitlines()]
    assert [line["perturbation"] for line in lines] == [
        p for p in PERTURBATIONS for _ in ws["test"]
    ]
    model = load_checkpoint(ws["root"] / "model" / "model.pth")
    for name, mirrored in PERTURBATIONS.items():
        mine = [line for line in lines if line["perturbation"] == name]
        assert [line["image"] for line in mine] == ws["test"]
        copies = torch.from_numpy(np.load(ws["root"] / "features" / "robust" / f"{name}.npy"))
        out = model.generate(grid=copies.float(), num_beams=2, max_length=20, length_penalty=1.0)
        assert [line["caption"] for line in mine] == [
            decode_caption(tokenizer, t) for t in out.tokens
        ]
        for line in mine:  # a mirrored copy is checked against the mirrored scene
            scene = ws["scenes"][line["image"]]
            expected = scene.mirrored() if mirrored else scene
            assert line["relation"] == expected.relation
            assert line["correct"] == content_correct(line["caption"], expected)
        rate = sum(line["correct"] for line in mine) / len(mine)
        assert ws["metrics"][f"robust_{name}"] == pytest.approx(rate, abs=1e-4)
    rates = [ws["metrics"][f"robust_{name}"] for name in PERTURBATIONS]
    assert ws["metrics"]["robust_min"] == min(rates)


def test_without_scenes_there_is_no_robustness_report_and_its_output_is_empty(ws, tmp_path):
    raw = shutil.copytree(ws["raw"], tmp_path / "raw", ignore=shutil.ignore_patterns(SCENES_FILE))
    (tmp_path / "out" / "robustness.jsonl").parent.mkdir()
    (tmp_path / "out" / "robustness.jsonl").write_text("stale\n")  # from an earlier run
    with tracking_off(ws):  # the workspace's run and registry stay as the other tests expect
        metrics = run_evaluate(ws["root"], raw, tmp_path / "out", PARAMS)
    assert not [key for key in metrics if key.startswith(("robust_", "content_"))]
    assert (tmp_path / "out" / "robustness.jsonl").read_text() == ""  # DVC's output, always


def test_sample_grid_is_a_png_of_the_expected_size(ws):
    with Image.open(ws["out"] / "samples.png") as image:
        assert image.format == "PNG"
        assert image.size == grid_size(PARAMS["grid_images"])
        pixels = np.asarray(image.convert("RGB")).astype(int)
    assert (ws["out"] / "samples.png").stat().st_size < 1_000_000
    # the caption bands under each row of images (the images hold red and green shapes too)
    rows = len(ws["test"]) // samples.COLUMNS + 1
    bands = [
        pixels[round(top * samples.DPI) : round((top + samples.TEXT_H) * samples.DPI)]
        for r in range(rows)
        for top in [samples.TITLE_H + r * samples.CELL_H + samples.NAME_H + samples.IMAGE_H]
    ]
    text = np.concatenate(bands)
    green, red = (np.array(ImageColor.getrgb(samples.COLOUR[ok])) for ok in (True, False))
    assert (np.abs(text - green).sum(-1) < 40).sum() > 50  # correct captions are drawn green
    assert (np.abs(text - red).sum(-1) < 40).sum() > 50  # and wrong ones red


def test_attention_figure_shows_two_object_scenes_first_as_evaluation_captions_them(
    ws, tokenizer, monkeypatch
):
    drawn = []
    draw = attention_plot.render_attention
    monkeypatch.setattr(
        attention_plot, "render_attention", lambda ex, *a: drawn.extend(ex) or draw(ex, *a)
    )
    captioner = load(ws["root"] / "model" / "model.pth")
    model = captioner.model
    features = np.load(ws["root"] / "features" / "test.npy")
    out = ws["root"] / "attention-again.png"
    decoding = EvaluateConfig.from_dict(PARAMS).decoding()
    attention_plot.evaluate_attention(captioner, ws["test"], features, ws["raw"], out, decoding)
    two = [i for i in ws["test"] if len(ws["scenes"][i].objects) == 2]
    rest = [i for i in ws["test"] if i not in two]
    shown = [e.name for e in drawn]
    assert shown == (two + rest)[: attention_plot.EVAL_IMAGES]
    assert shown != ws["test"][: attention_plot.EVAL_IMAGES]  # a one-object image was skipped
    captions = {line["image"]: line["caption"] for line in read_predictions(ws)}
    for example in drawn:
        assert example.caption == captions[example.name]
        assert example.grid == model.encoder.spec.grid
        assert example.weights.shape == (len(example.tokens), example.grid**2)
        np.testing.assert_allclose(example.weights.sum(1), 1.0, atol=1e-5)
    with Image.open(ws["out"] / "attention.png") as stage, Image.open(out) as again:
        assert stage.format == "PNG"
        assert (
            stage.size == again.size == attention_plot.figure_size([len(e.tokens) for e in drawn])
        )
        assert np.array_equal(np.asarray(stage), np.asarray(again))  # the stage drew the same


def test_mlflow_run_holds_eval_metrics_and_the_registry_a_captioning_model(ws):
    client = mlflow.MlflowClient()
    run = client.get_run(ws["run_id"])
    assert run.data.metrics["bleu4"] == pytest.approx(ws["metrics"]["bleu4"])
    assert run.data.metrics["content_accuracy"] == ws["metrics"]["content_accuracy"]
    artifacts = {a.path for a in client.list_artifacts(ws["run_id"], "evaluation")}
    assert artifacts == {
        "evaluation/eval.json",
        "evaluation/predictions.jsonl",
        "evaluation/samples.png",
        "evaluation/attention.png",
        "evaluation/robustness.jsonl",
    }

    assert run.data.tags[tracking.EVALUATED] == "true"

    (version,) = client.search_model_versions("name='imgtocap-synthetic'")
    assert version.run_id == ws["run_id"]  # the first evaluation completes training's run
    assert "cider" not in version.tags  # metrics live in the run, not again as tags
    assert version.tags["eval_run"] == ws["run_id"]
    assert version.tags["dataset"] == "synthetic" and version.tags["decode.num_beams"] == "2"
    champion = client.get_model_version_by_alias("imgtocap-synthetic", "champion")
    assert champion.version == version.version  # the first version is the champion
    # a store on this machine only: its stamp says so
    assert ws["registered"] == Registered("imgtocap-synthetic", "1", ws["run_id"], local=True)
    assert ws["registered"].archive_version() == "local-1"

    # the model card: in reports/ without a version; the version's description and in its run
    card = (ws["out"] / "model_card.md").read_text()
    assert card.startswith("# imgtocap (not registered)\n")
    assert version.description == retitle(card, "imgtocap-synthetic", "local-1")
    assert version.description.startswith("# imgtocap-synthetic version local-1\n")
    accuracy = ws["metrics"]["content_accuracy"]
    assert f"| content accuracy (colour, shape, relation) | {accuracy:.4f} |" in card
    assert "a photograph of a dog gets a caption about shapes" in card
    assert f"test split id `{version.tags['test_split']}`" in card
    logged = Path(client.download_artifacts(ws["run_id"], "model_card.md", str(ws["out"] / "dl")))
    assert logged.read_text() == version.description

    # the same evaluation tracked again (DVC runs `track` every time): looked up, not logged
    assert run_track(ws["root"], ws["raw"], ws["out"]) == ws["registered"]
    assert len(client.search_model_versions("name='imgtocap-synthetic'")) == 1

    loaded = mlflow.pyfunc.load_model("models:/imgtocap-synthetic@champion")
    images = ws["test"][:2] + ws["test"][-1:]
    data = pd.DataFrame({"image": [(ws["raw"] / "Images" / i).read_bytes() for i in images]})
    out = loaded.predict(data)  # from image bytes: decode, preprocess, encode, beam search
    expected = {line["image"]: line["caption"] for line in read_predictions(ws)}
    assert list(out["caption"]) == [expected[i] for i in images]
    greedy = loaded.predict(data, params={"num_beams": 1, "max_length": 3})
    assert all(len(c.split()) <= 3 for c in greedy["caption"])


def test_unreachable_tracking_server_warns_and_nothing_is_registered(ws, caplog):
    out = ws["root"] / "out_unreachable"
    with tracking_off(ws) as port, caplog.at_level(logging.WARNING):
        metrics = run_evaluate(ws["root"], ws["raw"], out, {**PARAMS, "grid_images": 2})
        registered = run_track(ws["root"], ws["raw"], out)
    assert metrics["bleu4"] == ws["metrics"]["bleu4"]  # evaluate does not need the server
    assert (out / "samples.png").is_file() and (out / "predictions.jsonl").is_file()
    assert f"127.0.0.1:{port} does not answer" in caplog.text
    assert registered == Registered() and registered.archive_version() == "unregistered"


def test_a_registry_failure_warns_and_leaves_the_training_run_finished(ws, monkeypatch, caplog):
    def refuse(*args, **kwargs):
        raise RuntimeError("registry says no")

    monkeypatch.setattr(registry, "register_model", refuse)
    out = ws["root"] / "out_refused"
    shutil.copytree(ws["out"], out)
    metrics = {**ws["metrics"], "bleu4": 0.123}  # another evaluation of the same model
    (out / "eval.json").write_text(json.dumps(metrics))
    with caplog.at_level(logging.WARNING):
        registered = run_track(ws["root"], ws["raw"], out)
    assert registered == Registered()
    assert "registry says no" in caplog.text
    client = mlflow.MlflowClient()
    run = client.get_run(ws["run_id"])
    assert run.info.status == "FINISHED"
    # a second evaluation of the same model is a run of its own: training's run keeps its metrics
    assert run.data.metrics["bleu4"] == ws["metrics"]["bleu4"]
    (child,) = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{ws['run_id']}'"
    )
    assert child.data.metrics["bleu4"] == 0.123  # logged before the registry refused
    assert child.data.tags[tracking.TRAIN_RUN] == ws["run_id"]
    assert publish_module.KEY not in child.data.tags  # so the next `dvc repro` logs it again


def test_features_from_another_encoder_are_refused(ws, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    index = json.loads((ws["root"] / "features" / "index.json").read_text())
    (features / "index.json").write_text(json.dumps({**index, "encoder": "resnet50"}))
    np.save(features / "test.npy", np.zeros((6, 49, 2048), np.float16))
    with pytest.raises(
        ValueError, match="'resnet50' features but the model uses the 'tiny'.*dvc repro"
    ):
        run_evaluate(ws["root"], ws["raw"], tmp_path, PARAMS, features=features)


def test_unknown_evaluate_param_is_an_error(ws, tmp_path):
    with pytest.raises(ValueError, match=r"unknown evaluate key\(s\) \['beams'\]"):
        run_evaluate(ws["root"], ws["raw"], tmp_path, {**PARAMS, "beams": 3})
