"""Does a word's attention land on its own object? Each layer's cross-attention, their mean,
Chefer et al.'s relevance (model/relevance.py) and uniform attention, on the trained model.

    .venv/bin/python bench/attention.py     # after `dvc repro` on the synthetic data; ~1 minute

Captions the test split as the evaluate stage does (params.yaml `evaluate:`), then for every
two-object scene whose caption names both objects correctly, takes the attention of each colour
and shape word (teacher forcing on the generated caption: equal to generation's, a test checks)
and measures how much of it falls on that object versus the other one (a grid cell counts by the
fraction of it the object's exact visible mask covers, drawn as the scene was), and the pointing
game: whether its highest cell holds pixels of its own object, of the other (for uniform
attention: the chance that a random cell does), for colour and shape words apart. Prints a
Markdown table and the relevance's cost per caption.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model import load  # noqa: E402
from model.relevance import relevance  # noqa: E402
from training.data.synthetic import load_scenes, parse_caption  # noqa: E402
from training.params import load_params  # noqa: E402
from training.paths import FEATURES_DIR, FEATURES_INDEX, MODEL_PATH, RAW_DIR  # noqa: E402
from training.stages.evaluate import EvaluateConfig  # noqa: E402


def main() -> None:
    captioner = load(ROOT / MODEL_PATH)
    model = captioner.model
    decoding = EvaluateConfig.from_dict(
        load_params(ROOT / "params.yaml").get("evaluate")
    ).decoding()
    names = json.loads((ROOT / FEATURES_DIR / FEATURES_INDEX).read_text())["splits"]["test"]
    features = torch.from_numpy(np.load(ROOT / FEATURES_DIR / "test.npy")).float()  # (n, N, C)
    scenes = load_scenes(ROOT / RAW_DIR)
    grid = model.encoder.spec.grid
    start = time.perf_counter()
    results = captioner.caption_features(features, decoding)
    decode_seconds = time.perf_counter() - start

    layers = model.config.num_layers
    rows = {f"layer {i + 1} (mean of heads)": i for i in range(layers)}
    rows["mean of all layers and heads"] = "mean"
    rows["relevance (Chefer et al. 2021)"] = "relevance"
    rows["uniform (chance)"] = "uniform"
    stats: dict[str, dict[str, list[float]]] = {r: {} for r in rows}
    seconds: list[float] = []  # relevance per caption
    for i, name in enumerate(names):
        scene = scenes.get(name)
        if scene is None or len(scene.objects) != 2:
            continue
        words = _word_tokens(results[i].tokens)
        mentions = parse_caption(results[i].caption).mentions
        objects = [_find(scene, m.colour, m.shape) for m in mentions]
        if len(mentions) != 2 or None in objects or objects[0] is objects[1]:
            continue  # only captions that name both objects right
        tokens = torch.tensor([[model.config.bos_id, *results[i].ids]])
        with torch.no_grad():
            cross = model.decoder.cross_keys_values(model.image_context(features[i : i + 1]))
            _, _, weights = model.decoder(tokens[:, :-1], cross=cross, need_weights=True)
        start = time.perf_counter()
        relevant = relevance(model, features[i : i + 1], tokens)[0]  # (T, N)
        seconds.append(time.perf_counter() - start)
        masks = _masks(scene, grid)
        for k, mention in enumerate(mentions):
            own, other = (
                masks[scene.objects.index(objects[k])],
                masks[1 - scene.objects.index(objects[k])],
            )
            for kind, word in (("colour", mention.at), ("shape", mention.at + 1)):
                t = words[word]
                for label, which in rows.items():
                    if which == "uniform":
                        a = np.full(grid * grid, 1 / grid**2)
                    elif which == "mean":
                        a = torch.stack(weights).mean((0, 2))[0, t].numpy()
                    elif which == "relevance":
                        a = relevant[t].numpy()
                    else:
                        a = weights[which].mean(1)[0, t].numpy()
                    m_own, m_other = float(a @ own), float(a @ other)
                    # uniform has no highest cell: a random cell's chance of touching a box
                    peak = int(a.argmax())
                    hit_own = (own > 0).mean() if which == "uniform" else own[peak] > 0
                    hit_other = (other > 0).mean() if which == "uniform" else other[peak] > 0
                    for key, value in (
                        ("own", m_own),
                        ("other", m_other),
                        ("share", m_own / max(m_own + m_other, 1e-12)),
                        (f"share_{kind}", m_own / max(m_own + m_other, 1e-12)),
                        ("peak_own", hit_own),
                        (f"peak_own_{kind}", hit_own),
                        ("peak_other", hit_other),
                    ):
                        stats[label].setdefault(key, []).append(float(value))
    count = len(stats["uniform (chance)"]["own"])
    print(
        f"\n{count} colour and shape words of {count // 4} two-object test captions that name "
        f"both objects right; {layers} decoder layers x {model.config.num_heads} heads; "
        f"beam {decoding.num_beams}.\n"
    )
    print(
        "| map | on its own object | on the other object | own / (own + other): "
        "colour words | shape words | highest cell on its own object: all | colour words "
        "| shape words | on the other |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, s in stats.items():
        mean = {key: float(np.mean(values)) for key, values in s.items()}
        print(
            f"| {label} | {mean['own']:.3f} | {mean['other']:.3f} | {mean['share_colour']:.2f} "
            f"| {mean['share_shape']:.2f} | {mean['peak_own']:.3f} "
            f"| {mean['peak_own_colour']:.3f} | {mean['peak_own_shape']:.3f} "
            f"| {mean['peak_other']:.2f} |"
        )
    print(
        f"\nrelevance: {1000 * float(np.median(seconds)):.1f} ms per caption (median of "
        f"{len(seconds)}, {torch.get_num_threads()} threads; captioning itself: "
        f"{1000 * decode_seconds / len(names):.1f} ms per image in batches of "
        f"{len(names)}, beam {decoding.num_beams})"
    )


def _word_tokens(pieces: list[str]) -> list[int]:
    """The token index where each word starts (a word is a piece plus its "##" pieces)."""
    return [t for t, piece in enumerate(pieces) if not piece.startswith("##")]


def _find(scene, colour: str, shape: str):
    matches = [o for o in scene.objects if (o.colour, o.shape) == (colour, shape)]
    return matches[0] if len(matches) == 1 else None


def _masks(scene, grid: int) -> list[np.ndarray]:
    """Per object (grid * grid,): the fraction of each cell (row-major) its visible pixels
    cover, the shapes drawn as `synthetic.draw_scene` draws them (later ones on top)."""
    size = scene.canvas
    label = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(label)
    for k, obj in enumerate(scene.objects, start=1):
        x0, y0, x1, y1 = obj.bbox
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=k)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=k)
        else:
            draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1) / 2, y0)), fill=k)
    pixels = np.asarray(label)  # (size, size): the object drawn last at each pixel
    edges = np.linspace(0, size, grid + 1).round().astype(int)
    masks = []
    for k in range(1, len(scene.objects) + 1):
        inside = (pixels == k).astype(np.float64)
        cells = [
            inside[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].mean()
            for r in range(grid)
            for c in range(grid)
        ]
        masks.append(np.array(cells))
    return masks


if __name__ == "__main__":
    main()
