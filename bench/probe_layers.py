"""Which layer of the frozen encoder still knows an object's colour? A linear probe per layer.

Draws one-object scenes of the embedded dataset (training/data/synthetic.py, its own seed), runs the
pretrained EfficientNet-Lite0 over them through the model's one preprocessing function, and
takes, for every stage, the feature vector of the cell under the object's centre: at the
stage's own resolution, average-pooled onto the 7x7 grid the decoder reads and, for the
stride-16 stages, with each grid cell's 2x2 sub-cells stacked (what the grid holds of stage
4). A softmax regression (standardised inputs, L2, full-batch L-BFGS) fits the colour on 80% of
the scenes and is scored on the rest; the same for the shape. Prints a Markdown table.

    .venv/bin/python bench/probe_layers.py            # ~1 minute on 2 CPU cores
    .venv/bin/python bench/probe_layers.py --images 3000

The last stage of an ImageNet classifier is shaped by its 1000 classes, few of which hinge on
colour: that is why the grid cell carries a middle stage too (model/encoders.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TQDM_DISABLE", "1")  # the dataset writer's progress bar: not a table

from model.encoders import ImageEncoder, preprocess  # noqa: E402
from model.image import open_image  # noqa: E402
from model.pretrained import encoder_state  # noqa: E402
from training.data.captions import IMAGES_DIR  # noqa: E402
from training.data.synthetic import load_scenes, write_synthetic  # noqa: E402


def stage_maps(encoder: ImageEncoder, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every stage's output of Lite0 (the last block of each width), its 1x1 head, and the
    model's own grid cells, from one pass of the encoder (hooks on the stages' last blocks)."""
    blocks, maps, hooks = encoder.backbone._blocks, {}, []
    for i, block in enumerate(blocks):
        width = block._project_conv.out_channels
        if i + 1 == len(blocks) or blocks[i + 1]._project_conv.out_channels != width:

            def keep(module, args, out, i=i):
                maps[f"block {i} ({out.shape[1]} ch, stride {224 // out.shape[-1]})"] = out

            hooks.append(block.register_forward_hook(keep))
    try:
        cells = encoder(pixels).transpose(1, 2).unflatten(2, (7, 7))  # (B, C, 7, 7)
    finally:
        for hook in hooks:
            hook.remove()
    last = encoder.spec.last_channels
    maps[f"head ({last} ch, stride 32)"] = cells[:, :last]
    maps["the model's grid cell (head + stage 4)"] = cells
    return maps  # name -> (B, C, h, w)


def cell(fmap: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """The feature vector under each centre ((B, 2) as fractions of the side): (B, C)."""
    h = fmap.shape[-1]
    ij = (centres * h).long().clamp(0, h - 1)  # (B, 2): column, row
    return fmap[torch.arange(len(fmap)), :, ij[:, 1], ij[:, 0]]


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, l2: float = 1e-2) -> float:
    """Held-out accuracy of a softmax regression fitted on the rows `train`."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-3
    x = (x - mean) / std
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300, line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        value = F.cross_entropy(x[train] @ weight + bias, y[train]) + l2 * weight.square().sum()
        value.backward()
        return value

    optimizer.step(loss)
    with torch.no_grad():
        return ((x[~train] @ weight + bias).argmax(1) == y[~train]).float().mean().item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="scenes drawn (40%% one object)")
    parser.add_argument("--seed", type=int, default=1, help="of the scenes (the dataset uses 0)")
    args = parser.parse_args()

    encoder = ImageEncoder("efficientnet_lite0")
    encoder.backbone.load_state_dict(encoder_state("efficientnet_lite0"))
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), args.images, seed=args.seed)
        scenes = {n: s for n, s in load_scenes(Path(tmp)).items() if len(s.objects) == 1}
        names = sorted(scenes)
        features: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(names), 16):
            batch = names[start : start + 16]
            pixels = torch.stack(
                [
                    preprocess(open_image(Path(tmp) / IMAGES_DIR / n), "efficientnet_lite0")
                    for n in batch
                ]
            )
            centres = torch.tensor(
                [[c / scenes[n].canvas for c in scenes[n].objects[0].centre] for n in batch]
            )
            for name, fmap in stage_maps(encoder, pixels).items():
                features.setdefault(name, []).append(cell(fmap, centres))
                if fmap.shape[-1] != 7:
                    grid = F.adaptive_avg_pool2d(fmap, 7)  # what a 7x7 grid cell holds of it
                    features.setdefault(name + " on the 7x7 grid", []).append(cell(grid, centres))
                if fmap.shape[-1] == 14:  # its 2x2 sub-cells stacked, as the model's grid holds
                    grid = F.pixel_unshuffle(fmap, 2)  # (B, 4C, 7, 7)
                    features.setdefault(name + " stacked onto the grid", []).append(
                        cell(grid, centres)
                    )
    colours = sorted({scenes[n].objects[0].colour for n in names})
    shapes = sorted({scenes[n].objects[0].shape for n in names})
    colour = torch.tensor([colours.index(scenes[n].objects[0].colour) for n in names])
    shape = torch.tensor([shapes.index(scenes[n].objects[0].shape) for n in names])
    train = torch.rand(len(names), generator=torch.Generator().manual_seed(0)) < 0.8
    print(
        f"{len(names)} one-object scenes, {int(train.sum())} to fit, "
        f"{int((~train).sum())} held out\n"
    )
    print("| features of the cell under the object | colour | shape |")
    print("|---|---:|---:|")
    for name, rows in features.items():
        x = torch.cat(rows).float()
        print(f"| {name} | {probe(x, colour, train):.3f} | {probe(x, shape, train):.3f} |")


if __name__ == "__main__":
    main()
