"""DVC stage `transform`: frozen-encoder features of every image, computed once.

The encoder never trains, so its output is a pure function of the image: computing it once
(fp16, ~125-200 KB per image) makes every training epoch and every change of training params
cheap. DVC re-runs this stage only when the images, the splits or the encoder change.

Augmentation keeps that property: `views` augmented copies of every training image
(training.data.augment: zoom, shift, flip, JPEG, blur, noise, brightness, contrast, tint) are
encoded here once, and each epoch the trainer draws one of them (or the image itself) per
image. For the synthetic data, the test split's perturbed copies (training.data.augment.PERTURBATIONS:
JPEG, down/up-scaled, padded, cropped, brightness, another canvas, flipped) are encoded here
too, for the evaluate stage's robustness report. Validation and test features are never
augmented.

Output (float16 grids (N, C) per image; row i of a split = index["splits"][split][i]):
`data/features/<split>.npy` (n_images, N, C); `train_views.npy` (n_train, views, N, C) with
`index["views"]["flipped"]` (n_train, views) saying which are mirrored; `robust/<name>.npy`
(n_test, N, C) per perturbation; `index.json` (encoder, grid, channels, splits, views,
robustness) and `encoder.pth`, the encoder weights used, which training starts from so the
model matches its features. Which encoder: params.yaml `model:` (preset, encoder, pretrained;
ResNet-50's file from `model.weights`, training.data.weights); how: `transform:` (device, batch
size, views, seed, robustness, augment).

`nproc_per_node` > 1: the stage re-launches itself under torchrun (training/runtime/distributed.py) and
the ranks share the batches of every store (batch k is rank k mod world size's): each rank
decodes, augments and encodes only the images of its own batches, on its own GPU, writing its
rows into the one memory-mapped store rank 0 created (which views are mirrored is gathered from
every rank for the index). Each batch holds the same images as in one process, so on a CPU the
stores are the same, byte for byte. One machine: the ranks share its filesystem.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from model.encoders import SPECS, ImageEncoder, preprocess
from model.image import open_image
from model.pretrained import encoder_state
from training.data.augment import (
    PERTURBATIONS,
    AugmentConfig,
    augmented_view,
    objects_box,
    perturb,
    rng_for,
)
from training.data.captions import IMAGES_DIR, SCENES_FILE
from training.data.synthetic import load_scenes
from training.data.weights import needed, weight_files
from training.params import ModelConfig, from_section, load_params, pick_device, stage_main
from training.paths import (
    ENCODER_WEIGHTS,
    FEATURES_DIR,
    FEATURES_INDEX,
    PROCESSED_PATH,
    RAW_DIR,
    ROBUST_DIR,
    TRAIN_VIEWS,
)
from training.runtime import distributed
from training.runtime.distributed import World
from training.runtime.process import die_with_dvc, die_with_launcher

log = logging.getLogger(__name__)

# How long a rank waits at a barrier for the others to finish their share of a split.
RANKS_TIMEOUT_S = 1800


@dataclass(frozen=True)
class TransformConfig:
    """The `transform` section of params.yaml: where and how images are encoded, which copies."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 4  # images per forward pass: 4 costs half the CPU of 32 (cache-sized)
    nproc_per_node: int = 1  # processes sharing the images (one per GPU), under torchrun
    views: int = 3  # augmented views of every training image, encoded besides it; 0: none
    seed: int = 0  # of the views' and the perturbed test copies' random draws
    robustness: bool = True  # encode the perturbed test copies (synthetic data only)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"transform.batch_size must be >= 1, got {self.batch_size}")
        if self.nproc_per_node < 1:
            raise ValueError(f"transform.nproc_per_node must be >= 1, got {self.nproc_per_node}")
        if self.views < 0:
            raise ValueError(f"transform.views must be >= 0, got {self.views}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TransformConfig:
        """Build from params.yaml's `transform` mapping; an unknown key is an error."""
        return from_section(cls, values, "transform")


def build_encoder(
    name: str, device: torch.device, pretrained: bool = True, file: Path | None = None
) -> ImageEncoder:
    """The frozen encoder with its pretrained weights (`file`: resnet50's), or seeded random
    ones when not `pretrained` (and always for `tiny`)."""
    with torch.random.fork_rng(devices=[]):  # a random encoder: the same one on every run
        torch.manual_seed(0)
        encoder = ImageEncoder(name)
    state = encoder_state(name, file) if pretrained else None
    if state is not None:
        encoder.backbone.load_state_dict(state)
    return encoder.to(device)


@torch.inference_mode()
def transform(
    cfg: TransformConfig,
    encoder_name: str,
    raw_dir: Path,
    processed_path: Path,
    out_dir: Path,
    pretrained: bool = True,
    weights: Path | None = None,
) -> dict:
    """Encode every image of every split, the training views and the perturbed test copies
    with `encoder_name` (from `weights` for resnet50, at random unless `pretrained`) into
    `out_dir`; returns the index. Under torchrun: this rank's share of the batches, into the
    stores rank 0 creates."""
    world = World.from_env()
    device = distributed.device_for(pick_device(cfg.device), world)
    distributed.join(world, torch.device("cpu"), RANKS_TIMEOUT_S)  # barriers only: gloo
    splits = {
        split: [entry["image"] for entry in entries]
        for split, entries in json.loads(processed_path.read_text())["splits"].items()
    }
    scenes = load_scenes(raw_dir) if (raw_dir / SCENES_FILE).is_file() else None
    encoder = build_encoder(encoder_name, device, pretrained, weights)
    writer = _FeatureWriter(_frozen(encoder, device), encoder_name, cfg.batch_size, device, world)
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)

    @functools.lru_cache(maxsize=1)  # a training image's views are made one after another
    def original(name: str) -> Image.Image:
        return open_image(raw_dir / IMAGES_DIR / name)

    for split, images in splits.items():

        def image(i: int, names: list[str] = images) -> Image.Image:
            return original(names[i])

        writer.write(out_dir / f"{split}.npy", (len(images),), image, split)
    index: dict[str, Any] = {
        "encoder": encoder_name,
        "grid": encoder.spec.grid,
        "channels": encoder.spec.channels,
        "dtype": "float16",
        "splits": splits,
    }
    train, test = splits.get("train", []), splits.get("test", [])
    if cfg.views and train:
        flipped = np.zeros((len(train), cfg.views), bool)  # this rank's, filled as views are made
        side = encoder.spec.image_size

        def view(i: int) -> Image.Image:  # item i: view i % views of training image i // views
            n, v = divmod(i, cfg.views)
            keep = objects_box((scenes or {}).get(train[n]))  # None: crops stay on the image
            rng = rng_for(cfg.seed, train[n], v)
            drawn, flipped[n, v] = augmented_view(original(train[n]), cfg.augment, rng, keep, side)
            return drawn

        writer.write(out_dir / TRAIN_VIEWS, flipped.shape, view, "train views")
        flipped = np.logical_or.reduce(distributed.gather(flipped, world))  # every rank's views
        index["views"] = {
            "count": cfg.views,
            "seed": cfg.seed,
            "augment": dataclasses.asdict(cfg.augment),
            "flipped": flipped.astype(int).tolist(),
        }
    if cfg.robustness and scenes and test:
        if world.main:
            (out_dir / ROBUST_DIR).mkdir(exist_ok=True)
        for k, name in enumerate(PERTURBATIONS):

            def copy(i: int, name: str = name, k: int = k) -> Image.Image:
                rng = rng_for(cfg.seed, test[i], 1000 + k)
                return perturb(name, original(test[i]), scenes[test[i]], rng)[0]

            writer.write(out_dir / ROBUST_DIR / f"{name}.npy", (len(test),), copy, name)
        index["robustness"] = {"seed": cfg.seed, "perturbations": list(PERTURBATIONS)}
    elif cfg.robustness and test:
        log.info("no scenes.json in %s: no perturbed test copies (synthetic data only)", raw_dir)
    distributed.barrier(world)  # every rank's rows are written
    distributed.leave(world)
    if not world.main:
        return index
    (out_dir / FEATURES_INDEX).write_text(json.dumps(index) + "\n")
    # training starts from exactly these weights (a random `tiny` encoder included)
    torch.save(encoder.backbone.state_dict(), out_dir / ENCODER_WEIGHTS)
    log.info(
        "features: %s, %d views per training image, %d perturbed test copies",
        {s: len(v) for s, v in splits.items()},
        index.get("views", {}).get("count", 0),
        len(index.get("robustness", {}).get("perturbations", [])),
    )
    return index


def _frozen(encoder: ImageEncoder, device: torch.device) -> torch.jit.ScriptModule:
    """The encoder traced and frozen (BatchNorm folded into the convolutions): ~1.5x faster
    on a CPU; its features differ from eager ones by ~1e-5, far below fp16 precision."""
    size = encoder.spec.image_size
    example = torch.zeros(2, 3, size, size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # fixed shapes: padding may freeze
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation (torch is pinned)
        return torch.jit.optimize_for_inference(torch.jit.trace(encoder, example))


@dataclass(frozen=True)
class _FeatureWriter:
    """Runs the frozen encoder over images, in batches, into a float16 .npy file; under
    torchrun, this rank's batches into the file rank 0 creates."""

    frozen: torch.jit.ScriptModule
    encoder: str
    batch_size: int
    device: torch.device
    world: World = distributed.ONE_PROCESS

    def write(
        self, path: Path, shape: tuple[int, ...], item: Callable[[int], Image.Image], what: str
    ):
        """Encode items 0 .. prod(shape) - 1 (`item(i)` makes one) through the model's one
        preprocessing function into `path`, an array of `shape` + (N, C). Batch k is rank
        k mod world size's: a rank makes only the items of its own batches."""
        spec = SPECS[self.encoder]
        cell = (spec.grid**2, spec.channels)
        if self.world.main:
            np.lib.format.open_memmap(path, "w+", np.float16, (*shape, *cell)).flush()
        distributed.barrier(self.world)  # the file exists at its full size: each rank fills rows
        features = np.load(path, mmap_mode="r+")
        rows = features.reshape(-1, *cell)  # (n, N, C): a view of the file
        starts = range(0, len(rows), self.batch_size)[self.world.rank :: self.world.size]
        for start in tqdm(starts, desc=f"encode {what}", unit="batch", disable=not self.world.main):
            end = min(start + self.batch_size, len(rows))
            pixels = torch.stack([preprocess(item(i), self.encoder) for i in range(start, end)])
            rows[start:end] = self.frozen(pixels.to(self.device)).half().cpu().numpy()  # (b, N, C)
        features.flush()
        del features, rows


@record  # under torchrun: a worker's traceback goes into torchrun's report of the failure
@stage_main  # inside record: a StageError is its message and exit status 1, no traceback
def main() -> None:
    """`python -m training.stages.transform`: data/processed + data/raw -> data/features."""
    world = World.from_env()
    logging.basicConfig(
        level=logging.INFO if world.main else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    params = load_params()
    cfg = TransformConfig.from_dict(params.get("transform"))
    model = ModelConfig.from_dict(params.get("model"))
    config = model.captioner_config()
    # every file the model starts from, the decoder's too: a run that could not train stops
    # here, before encoding for minutes, with one message naming all of them (and before any
    # worker starts: they find them cached)
    files = {}
    if model.pretrained:
        files = weight_files(needed(config), model.weights, f"model.preset {model.preset}")
    if cfg.nproc_per_node > 1 and not distributed.under_torchrun():
        die_with_dvc()
        distributed.launch("training.stages.transform", cfg.nproc_per_node)
        return
    if distributed.under_torchrun():
        die_with_launcher()
    transform(
        cfg,
        config.encoder,
        RAW_DIR,
        PROCESSED_PATH,
        FEATURES_DIR,
        model.pretrained,
        files.get(config.encoder),
    )


if __name__ == "__main__":
    main()
