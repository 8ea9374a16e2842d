"""DVC stage `preprocess`: the captions validation kept -> token ids, split by image.

All captions of an image are kept (Flickr8k has five). Splits are by IMAGE, never by caption,
so no test image is seen in training: Flickr8k's official split files when ingest found them,
otherwise a seeded shuffle; identical image files (validation's `duplicate_images`) always
land in the same split. It refuses (non-zero exit, nothing written) a failed validation, a
split with no images, and captions that are more than 5% [UNK] (training.data.datachecks).

Output `data/processed/captions.json`:
`{"tokenizer", "max_tokens", "splits": {"train"|"val"|"test": [{"image", "captions", "tokens"}]}}`
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model import encode_caption, load_tokenizer, normalize_caption
from training.data.captions import SPLITS_FILE, valid_rows
from training.data.datachecks import check_unknown_pieces
from training.params import ModelConfig, from_section, load_params, stage_main
from training.paths import PROCESSED_PATH, RAW_DIR, REPORT_PATH

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PreprocessConfig:
    """The `preprocess` section of params.yaml."""

    max_tokens: int = 32  # [CLS] + caption + [SEP]; longer captions are truncated
    val_fraction: float = 0.05  # of the images; Flickr8k's official splits win when present
    test_fraction: float = 0.05
    seed: int = 0  # of the shuffle that splits the images

    def __post_init__(self) -> None:
        if self.val_fraction < 0 or self.test_fraction < 0:
            raise ValueError("preprocess.val_fraction and test_fraction must be >= 0")
        if not self.val_fraction + self.test_fraction < 1:
            raise ValueError("preprocess.val_fraction + test_fraction must be in [0, 1)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> PreprocessConfig:
        """Build from params.yaml's `preprocess` mapping; an unknown key is an error."""
        return from_section(cls, values, "preprocess")


def split_images(
    images: list[str],
    official: dict[str, list[str]] | None,
    duplicate_groups: list[list[str]],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> dict[str, list[str]]:
    """Assign every image to train/val/test; identical files share a split."""
    if official:
        assigned = {image: split for split in SPLITS for image in official.get(split, [])}
        unlisted = [image for image in images if image not in assigned]
        if unlisted:  # Flickr8k's split files list 8000 of its 8091 images
            log.info("%d images are in no official split: training on them", len(unlisted))
        return {s: [i for i in images if assigned.get(i, "train") == s] for s in SPLITS}

    group_of = {image: image for image in images}
    for group in duplicate_groups:
        for image in group:
            group_of[image] = group[0]
    members: dict[str, list[str]] = defaultdict(list)
    for image in images:
        members[group_of[image]].append(image)
    keys = sorted(members)
    np.random.default_rng(seed).shuffle(keys)
    n_test = round(test_fraction * len(images))
    n_val = round(val_fraction * len(images))
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key in keys:
        split = "test" if len(splits["test"]) < n_test else "val"
        if split == "val" and len(splits["val"]) >= n_val:
            split = "train"
        splits[split].extend(members[key])
    return {s: sorted(v) for s, v in splits.items()}


def preprocess(
    cfg: PreprocessConfig,
    tokenizer_source: str,
    raw_dir: Path,
    report_path: Path,
    out_path: Path,
) -> dict[str, Any]:
    """Tokenise the kept captions of `raw_dir` into `out_path`; returns what was written.

    Refuses (ValueError) data a model cannot learn from: a failed validation, an empty split,
    captions that are mostly [UNK]. The previous output is removed first, as DVC does, so a
    refusal leaves nothing for a later stage to read.
    """
    out_path.unlink(missing_ok=True)
    captions: dict[str, list[str]] = defaultdict(list)
    empty = 0
    for row in valid_rows(raw_dir, report_path):
        text = normalize_caption(row.caption)
        if text:
            captions[row.image].append(text)
        else:
            empty += 1
    if empty:
        log.warning("%d captions are empty after normalisation (only punctuation): skipped", empty)
    if not captions:
        raise ValueError(f"no valid captions in {raw_dir}: see {report_path}")

    report = json.loads(Path(report_path).read_text())
    splits_file = Path(raw_dir) / SPLITS_FILE
    official = json.loads(splits_file.read_text()) if splits_file.is_file() else None
    splits = split_images(
        sorted(captions),
        official,
        report.get("duplicate_images", []),
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.seed,
    )
    empty_splits = [split for split, images in splits.items() if not images]
    if empty_splits:
        raise ValueError(
            f"the {' and '.join(empty_splits)} split(s) would hold no images ({len(captions)} "
            f"images with valid captions in all; preprocess.val_fraction={cfg.val_fraction}, "
            f"test_fraction={cfg.test_fraction}"
            + (f", official splits from {splits_file}" if official else "")
            + "): every split needs images. Add data, or raise the fraction"
        )

    tokenizer = load_tokenizer(tokenizer_source)
    truncated = 0
    out: dict[str, Any] = {
        "tokenizer": tokenizer_source,
        "max_tokens": cfg.max_tokens,
        "splits": {},
    }
    for split, images in splits.items():
        entries = []
        for image in images:
            tokens = [encode_caption(tokenizer, c) for c in captions[image]]
            long = [i for i, t in enumerate(tokens) if len(t) > cfg.max_tokens]
            for i in long:
                tokens[i] = encode_caption(tokenizer, captions[image][i], cfg.max_tokens)
            truncated += len(long)
            entries.append({"image": image, "captions": captions[image], "tokens": tokens})
        out["splits"][split] = entries
        log.info(
            "%s: %d images, %d captions",
            split,
            len(entries),
            sum(len(e["tokens"]) for e in entries),
        )
    if truncated:
        log.warning(
            "%d captions longer than max_tokens=%d were truncated", truncated, cfg.max_tokens
        )
    unknown = check_unknown_pieces(out["splits"], tokenizer, tokenizer_source)
    if unknown:
        log.info("%.2f%% of the caption WordPieces are [UNK]", 100 * unknown)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out) + "\n")
    return out


@stage_main
def main() -> None:
    """`python -m training.stages.preprocess`: data/raw + validation report -> data/processed."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    cfg = PreprocessConfig.from_dict(params.get("preprocess"))
    tokenizer = ModelConfig.from_dict(params.get("model")).captioner_config().tokenizer
    preprocess(cfg, tokenizer, RAW_DIR, REPORT_PATH, PROCESSED_PATH)


if __name__ == "__main__":
    main()
