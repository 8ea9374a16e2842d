"""The train stage's input: one split's precomputed image features and captions, in batches.

`load_splits` reads what transform (features) and preprocess (token ids) wrote, checked, as a
`CaptionData` per split; `CaptionData.batches` puts whole images with their captions together,
shuffled by a generator, drawing augmented views and captions; `shard` gives each DDP rank its
contiguous part of a batch every rank drew alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import CaptionerConfig
from training.data.augment import mirror_ids, mirror_tokens
from training.data.datachecks import check_feature_rows, check_features, check_learnable
from training.paths import FEATURES_INDEX, TRAIN_VIEWS
from training.runtime.distributed import World


class CaptionData:
    """One split: image features (n, N, C) fp16 and all captions of every image.

    A batch holds whole images with all their captions: the image's projected memory is
    computed once and shared by its captions (`rows`), which saves a third of the compute.
    Where transform encoded augmented views (the train split), each shuffled pass draws one
    per image, the image itself included; a mirrored view comes with its captions mirrored
    ("left" and "right" swapped in the token ids).
    """

    def __init__(self, processed: dict[str, Any], features_dir: Path, split: str, pad_id: int):
        entries = processed["splits"][split]
        index = json.loads((features_dir / FEATURES_INDEX).read_text())
        if index["splits"][split] != [e["image"] for e in entries]:
            raise ValueError(
                f"{features_dir} does not match {split} of data/processed: run `dvc repro` "
                "(the transform stage) again"
            )
        self.grid = torch.from_numpy(np.load(features_dir / f"{split}.npy"))  # (n, N, C) fp16
        sequences = [seq for e in entries for seq in e["tokens"]]
        self.tokens = torch.full((len(sequences), max(map(len, sequences), default=2)), pad_id)
        for i, seq in enumerate(sequences):
            self.tokens[i, : len(seq)] = torch.tensor(seq)
        counts = torch.tensor([len(e["tokens"]) for e in entries])
        self.first = torch.cumsum(counts, 0) - counts  # image i's captions: first[i] + 0..count-1
        self.counts = counts
        self.pad_id = pad_id
        self.views: np.ndarray | None = None  # (n, K, N, C) fp16, memory-mapped
        if split == "train" and "views" in index:
            self.views = np.load(features_dir / TRAIN_VIEWS, mmap_mode="r")
            self.flipped = torch.tensor(index["views"]["flipped"], dtype=torch.bool)  # (n, K)
            if self.views.shape[:2] != tuple(self.flipped.shape) or len(self.grid) != len(
                self.views
            ):
                raise ValueError(
                    f"{features_dir / TRAIN_VIEWS} does not match its index: run `dvc repro -f "
                    "transform`"
                )
            if self.flipped.any():
                self.mirrored = mirror_tokens(self.tokens, *mirror_ids(processed["tokenizer"]))

    def to(self, device: torch.device) -> CaptionData:
        """Hold the features on `device` (a GPU: no copy per step); the captions stay on the
        CPU, where batches are put together without waiting for the GPU."""
        self.grid = self.grid.to(device)
        return self

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        captions_per_image: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(grid (I, N, C) fp16, tokens (B, T), rows (B,)): B ~ batch_size captions of I images.

        Each image comes with all its captions, or with `captions_per_image` of them drawn at
        random (a new draw each epoch: over epochs every caption is used). Images are shuffled
        when given a generator, and then each image is one of its views, drawn at random.
        """
        n = len(self.counts)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        view = torch.zeros(n, dtype=torch.long)  # 0: the image itself; v: views[:, v - 1]
        if generator is not None and self.views is not None:
            view = torch.randint(self.views.shape[1] + 1, (n,), generator=generator)
        used = self.counts.clamp(max=captions_per_image) if captions_per_image else self.counts
        for start in range(0, n, self._images_per_batch(batch_size, used)):
            images = order[start : start + self._images_per_batch(batch_size, used)]  # (I,)
            counts = used[images]
            rows = torch.repeat_interleave(torch.arange(len(images)), counts)  # (B,)
            if captions_per_image:
                offsets = torch.cat(
                    [
                        torch.randperm(int(self.counts[i]), generator=generator)[: int(c)]
                        for i, c in zip(images, counts)
                    ]
                )
            else:
                offsets = torch.arange(len(rows)) - torch.repeat_interleave(
                    torch.cumsum(counts, 0) - counts, counts
                )
            picked = self.first[images][rows] + offsets  # (B,) caption rows
            tokens = self.tokens[picked]  # (B, T)
            grid = self.grid[images.to(self.grid.device, non_blocking=True)]  # (I, N, C)
            augmented = view[images] > 0  # (I,)
            if augmented.any():
                which = images[augmented], view[images][augmented] - 1  # (A,), (A,)
                drawn = torch.from_numpy(self.views[which[0].numpy(), which[1].numpy()])
                grid[augmented.to(grid.device)] = drawn.to(grid.device)  # (A, N, C)
                flip = torch.zeros(len(images), dtype=torch.bool)
                flip[augmented] = self.flipped[which]
                if flip.any():
                    tokens = torch.where(flip[rows, None], self.mirrored[picked], tokens)
            width = int((tokens != self.pad_id).sum(1).max())  # trim padding columns
            yield grid, tokens[:, :width], rows

    def steps(self, batch_size: int, captions_per_image: int | None = None) -> int:
        """Batches per pass over the split."""
        used = self.counts.clamp(max=captions_per_image) if captions_per_image else self.counts
        return math.ceil(len(self.counts) / self._images_per_batch(batch_size, used))

    @staticmethod
    def _images_per_batch(batch_size: int, used: torch.Tensor) -> int:
        return max(1, round(batch_size / max(1.0, used.float().mean().item())))


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # grid (I, N, C), tokens (B, T), rows (B,)


def shard(batch: Batch, world: World, pad_id: int) -> tuple[Batch, int]:
    """This rank's part of a batch every rank drew alike: a contiguous run of its images with
    their captions (possibly none), and the whole batch's number of targets (non-pad tokens
    after [CLS]: the mean loss's denominator). One process: the batch itself."""
    grid, tokens, rows = batch
    targets = int((tokens[:, 1:] != pad_id).sum())  # on the CPU: no wait for the GPU
    if world.size == 1:
        return batch, targets
    lo, hi = len(grid) * world.rank // world.size, len(grid) * (world.rank + 1) // world.size
    mine = (rows >= lo) & (rows < hi)  # rows are sorted: a contiguous run of captions
    tokens, rows = tokens[mine], rows[mine] - lo
    width = int((tokens != pad_id).sum(1).max()) if len(tokens) else 2  # trim padding columns
    return (grid[lo:hi], tokens[:, :width], rows), targets


def load_splits(
    config: CaptionerConfig, processed_path: Path, features_dir: Path, device: torch.device
) -> tuple[CaptionData, CaptionData]:
    """The train and val splits, refused unless the features are the config's encoder's and a
    model can learn the captions; on a GPU the features are held there (no copy per step)."""
    index = json.loads((features_dir / FEATURES_INDEX).read_text())
    check_features(index, config.encoder, features_dir)
    processed = json.loads(processed_path.read_text())
    train = CaptionData(processed, features_dir, "train", config.pad_id)
    val = CaptionData(processed, features_dir, "val", config.pad_id)
    for split, data in (("train", train), ("val", val)):
        where = f"{processed_path}, {features_dir / f'{split}.npy'}"
        check_learnable(split, data.tokens, data.grid, config, where)
    if train.views is not None:
        check_feature_rows(train.views, f"the training views ({features_dir / TRAIN_VIEWS})")
    if device.type == "cuda":
        train.to(device)
        val.to(device)
    return train, val
