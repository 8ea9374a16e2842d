"""DVC stage `transform`: frozen-encoder features of every image, computed once.

The encoder never trains, so its output is a pure function of the image: computing it once
(fp16, ~125-200 KB per image) makes every training epoch and every change of training params
cheap. DVC re-runs this stage only when the images, the splits or the encoder change.

Output: `data/features/<split>.npy` (n_images, N, C) float16, row i = index["splits"][split][i],
`data/features/index.json` (encoder, grid, channels, splits) and `data/features/encoder.pth`,
the encoder weights used, which training starts from so the model matches its features.
Which encoder: params.yaml `model:` (preset, encoder, pretrained; ResNet-50's file from
`model.weights`, training.weights); how: `transform:` (device, batch size, processes).

`nproc_per_node` > 1: the stage re-launches itself under torchrun (training/distributed.py) and
the ranks share the batches (batch k is rank k mod world size's), each encoding on its own GPU
and decoding its own images, every rank writing its rows into the one memory-mapped store rank 0
created: each batch holds the same images as in one process, so on a CPU the store is the
same, byte for byte. One machine: the ranks share its filesystem.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from model.encoders import ImageEncoder, preprocess
from model.image import open_image
from model.pretrained import encoder_state
from training import distributed
from training.captions import IMAGES_DIR
from training.distributed import World
from training.params import ModelParams, from_section, load_params, pick_device, stage_main
from training.paths import ENCODER_WEIGHTS, FEATURES_DIR, FEATURES_INDEX, PROCESSED_PATH, RAW_DIR
from training.process import die_with_dvc, die_with_launcher
from training.weights import needed, weight_files

log = logging.getLogger(__name__)

# How long a rank waits at a barrier for the others to finish their share of a split.
RANKS_TIMEOUT_S = 1800


@dataclass(frozen=True)
class TransformConfig:
    """The `transform` section of params.yaml: where and how many images are encoded at once."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 32  # images per forward pass
    nproc_per_node: int = 1  # processes sharing the images (one per GPU), under torchrun

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"transform.batch_size must be >= 1, got {self.batch_size}")
        if self.nproc_per_node < 1:
            raise ValueError(f"transform.nproc_per_node must be >= 1, got {self.nproc_per_node}")

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
    """Encode every image of every split with `encoder_name` (from `weights` for resnet50, at
    random unless `pretrained`) into `out_dir`; returns the index. Under torchrun: this rank's
    share of the batches, into the store rank 0 creates."""
    world = World.from_env()
    device = distributed.device_for(pick_device(cfg.device), world)
    distributed.join(world, torch.device("cpu"), RANKS_TIMEOUT_S)  # barriers only: gloo
    splits = {
        split: [entry["image"] for entry in entries]
        for split, entries in json.loads(processed_path.read_text())["splits"].items()
    }
    encoder = build_encoder(encoder_name, device, pretrained, weights)
    spec = encoder.spec
    # Traced and frozen (BatchNorm folded into the convolutions): ~1.5x faster on a CPU; the
    # features differ from eager ones by ~1e-5, far below their fp16 storage precision.
    example = torch.zeros(2, 3, spec.image_size, spec.image_size, device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # fixed shapes: padding may freeze
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation (torch is pinned)
        frozen = torch.jit.optimize_for_inference(torch.jit.trace(encoder, example))
    if world.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    for split, images in splits.items():
        shape = (len(images), spec.grid**2, spec.channels)
        if world.main:
            np.lib.format.open_memmap(out_dir / f"{split}.npy", "w+", np.float16, shape).flush()
        distributed.barrier(world)  # the file exists at its full size: each rank fills its rows
        features = np.load(out_dir / f"{split}.npy", mmap_mode="r+")
        batches = range(0, len(images), cfg.batch_size)[world.rank :: world.size]
        for start in tqdm(batches, desc=f"encode {split}", unit="batch", disable=not world.main):
            names = images[start : start + cfg.batch_size]
            pixels = torch.stack(
                [preprocess(open_image(raw_dir / IMAGES_DIR / n), encoder_name) for n in names]
            )  # (b, 3, S, S)
            grid = frozen(pixels.to(device))  # (b, N, C)
            features[start : start + len(names)] = grid.half().cpu().numpy()
        features.flush()
        del features
    distributed.barrier(world)  # every rank's rows are written
    distributed.leave(world)
    index = {
        "encoder": encoder_name,
        "grid": spec.grid,
        "channels": spec.channels,
        "dtype": "float16",
        "splits": splits,
    }
    if world.main:
        (out_dir / FEATURES_INDEX).write_text(json.dumps(index) + "\n")
        # training starts from exactly these weights (a random `tiny` encoder included)
        torch.save(encoder.backbone.state_dict(), out_dir / ENCODER_WEIGHTS)
        log.info("features: %s", {s: len(v) for s, v in splits.items()})
    return index


@stage_main
@record  # under torchrun: a worker's traceback goes into torchrun's report of the failure
def main() -> None:
    """`python -m training.transform`: data/processed + data/raw -> data/features."""
    world = World.from_env()
    logging.basicConfig(
        level=logging.INFO if world.main else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    params = load_params()
    cfg = TransformConfig.from_dict(params.get("transform"))
    model = ModelParams.from_dict(params.get("model"))
    config = model.captioner_config()
    # every file the model starts from, the decoder's too: a run that could not train stops
    # here, before encoding for minutes, with one message naming all of them (and before any
    # worker starts: they find them cached)
    files = {}
    if model.pretrained:
        files = weight_files(needed(config), model.weights, f"model.preset {model.preset}")
    if cfg.nproc_per_node > 1 and not distributed.under_torchrun():
        die_with_dvc()
        distributed.launch("training.transform", cfg.nproc_per_node)
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
