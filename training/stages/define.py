"""DVC stage `define`: the model's architecture, resolved from params, and its size.

Writes `artifacts/model/config.json` (the CaptionerConfig every later stage builds from) and
`reports/model_size.json` (parameter counts). With `model.output_vocab: dataset` the output layer
covers the WordPiece ids of the train and val captions (plus [SEP]), read from
data/processed; nothing is downloaded here: the model is built on the meta device.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from model import Captioner, CaptionerConfig
from training.params import ModelConfig, load_params, stage_main
from training.paths import CONFIG_PATH, PROCESSED_PATH, SUMMARY_PATH

log = logging.getLogger(__name__)


def dataset_vocab(processed_path: Path, eos_id: int) -> list[int]:
    """Sorted token ids of the train + val captions, [SEP] included, [CLS] excluded."""
    splits = json.loads(processed_path.read_text())["splits"]
    ids = {
        t
        for split in ("train", "val")
        for e in splits[split]
        for seq in e["tokens"]
        for t in seq[1:]
    }
    return sorted(ids | {eos_id})


def parameter_summary(config: CaptionerConfig) -> dict[str, Any]:
    """Total / trainable / frozen parameter counts, and per top-level module."""
    with torch.device("meta"):  # shapes only: no memory, no download
        model = Captioner(config)
    by_module: dict[str, int] = {}
    for name, param in model.named_parameters():
        by_module[name.split(".")[0]] = by_module.get(name.split(".")[0], 0) + param.numel()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {
        "total_params": total,
        "trainable_params": trainable,
        "frozen_params": total - trainable,
        "params_by_module": by_module,
    }


def define(
    cfg: ModelConfig, processed_path: Path, config_path: Path, summary_path: Path
) -> tuple[CaptionerConfig, dict[str, Any]]:
    """Resolve the model params into a CaptionerConfig, save it and its parameter summary."""
    config = cfg.captioner_config()
    if cfg.output_vocab == "dataset":
        config.output_vocab = dataset_vocab(processed_path, config.eos_id)
        CaptionerConfig.from_dict(config.to_dict())  # re-validate
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config.save(config_path)
    summary = parameter_summary(config)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    vocab = len(config.output_vocab) if config.output_vocab else config.vocab_size
    log.info(
        "%s encoder + %s decoder (%s fusion), output vocabulary %d: %.1fM parameters, %.1fM trainable",
        config.encoder,
        config.decoder_weights,
        config.fusion,
        vocab,
        summary["total_params"] / 1e6,
        summary["trainable_params"] / 1e6,
    )
    return config, summary


@stage_main
def main() -> None:
    """`python -m training.stages.define`: params.yaml (+ data/processed) -> artifacts/model/config.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = ModelConfig.from_dict(load_params().get("model"))
    define(cfg, PROCESSED_PATH, CONFIG_PATH, SUMMARY_PATH)


if __name__ == "__main__":
    main()
