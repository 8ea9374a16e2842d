"""DVC stage `ingest`: bring a dataset into the raw layout `data/raw/` (see training.data.captions).

Sources (`data.source` in params.yaml):
- `synthetic`: generate the embedded shapes dataset (training.data.synthetic).
- `flickr8k`: a local zip or folder (`data.flickr8k.path`), or, when path is null, the two
  official archives downloaded into a cache with checksum, resume and progress. Both layouts
  are accepted: Kaggle (`Images/` + `captions.txt`) and the original (`Flicker8k_Dataset/` +
  `Flickr8k.token.txt` + `Flickr_8k.{train,dev,test}Images.txt` -> splits.json).
- `folder`: any dataset in the Kaggle layout (`Images/` + `captions.txt`).
- `karpathy`: a Karpathy-split caption file (`dataset_flickr8k.json`, `dataset_flickr30k.json`,
  `dataset_coco.json`: what most captioning code trains from) and its image folder or zip;
  its train/val/test splits go to splits.json, `restval` (COCO's rest of val2014) into train.

Ingest copies data as it finds it; judging it is validate's job. It fails only when the source
is missing or holds neither layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
import zlib
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from training.data.captions import CAPTIONS_FILE, IMAGES_DIR, SPLITS_FILE, write_captions
from training.data.download import download, url_file_name
from training.data.synthetic import write_synthetic
from training.params import DataConfig, Flickr8kConfig, KarpathyConfig, load_params, stage_main
from training.paths import RAW_DIR

log = logging.getLogger(__name__)

ORIGINAL_IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")  # the archive's own misspelling
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


def ingest(cfg: DataConfig, out_dir: Path) -> Path:
    """Write the configured source into `out_dir` in the raw layout, replacing what was there."""
    out_dir = Path(out_dir)
    # Build beside the target and swap at the end: an interrupted run leaves no half dataset,
    # and a failed one leaves nothing (the previous data/raw, if any, stays as it was).
    work = out_dir.with_name(out_dir.name + ".ingesting")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        _write_source(cfg, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    log.info("raw dataset ready in %s", out_dir)
    return out_dir


def _write_source(cfg: DataConfig, work: Path) -> None:
    if cfg.source == "synthetic":
        write_synthetic(work, **vars(cfg.synthetic))
    elif cfg.source == "flickr8k":
        if cfg.flickr8k.path:
            roots = [_existing(cfg.flickr8k.path, "data.flickr8k.path")]
        else:
            roots = fetch_flickr8k(cfg.flickr8k)
        _copy_dataset(roots, work, original_ok=True)
    elif cfg.source == "karpathy":
        _copy_karpathy(cfg.karpathy, work)
    else:
        if not cfg.folder.path:
            raise ValueError(
                "data.source is folder but data.folder.path is not set: point it at a folder "
                "holding Images/ and captions.txt"
            )
        _copy_dataset([_existing(cfg.folder.path, "data.folder.path")], work, original_ok=False)


@stage_main
def main() -> None:
    """`python -m training.stages.ingest`: read params.yaml and write data/raw."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ingest(DataConfig.from_dict(load_params().get("data")), RAW_DIR)


# ------------------------------------------------------------------------------ download


def fetch_flickr8k(cfg: Flickr8kConfig) -> list[Path]:
    """Download (or reuse from the cache) the Flickr8k text and image archives."""
    cache = Path(cfg.cache_dir).expanduser()
    text = download(
        cfg.text_url,
        cache / url_file_name(cfg.text_url),
        cfg.text_sha256,
        cfg.text_md5,
        key="data.flickr8k.text",
    )
    images = download(
        cfg.images_url,
        cache / url_file_name(cfg.images_url),
        cfg.images_sha256,
        cfg.images_md5,
        key="data.flickr8k.images",
    )
    return [images, text]


# ------------------------------------------------------------------------ layouts, copying


@dataclass(frozen=True)
class _Entry:
    """A file of the source: on disk (`path`) or a member of an open zip (`archive`)."""

    name: str  # posix path inside its root
    path: Path | None = None
    archive: zipfile.ZipFile | None = None

    def read_bytes(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        return self.archive.read(self.name)


def _copy_dataset(roots: list[Path], work: Path, original_ok: bool) -> None:
    """Find a known layout in the roots (zips or folders) and write it into `work`."""
    with ExitStack() as stack:
        files = _list_files(roots, stack)
        if _is_layout(files, original_ok) == (None, None):
            # A folder holding the downloaded archives themselves: look inside them too.
            zips = [p for r in roots if r.is_dir() for p in sorted(r.glob("*.zip"))]
            if zips:
                files = {**_list_files(zips, stack), **files}
        kaggle, original = _is_layout(files, original_ok)
        if original:
            _copy_original(files, original, work)
        elif kaggle is not None:
            _copy_kaggle(files, kaggle, work)
        else:
            raise FileNotFoundError(_no_layout_message(roots, files, original_ok))


def _list_files(roots: list[Path], stack: ExitStack) -> dict[str, _Entry]:
    """Every regular file under the roots by posix path, skipping macOS and hidden debris."""
    files: dict[str, _Entry] = {}
    for root in roots:
        if root.is_dir():
            for dirpath, dirnames, filenames in os.walk(root):
                dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
                for filename in sorted(filenames):
                    path = Path(dirpath, filename)
                    name = path.relative_to(root).as_posix()
                    files.setdefault(name, _Entry(name, path=path))
        else:
            try:
                archive = stack.enter_context(zipfile.ZipFile(root))
            except zipfile.BadZipFile as exc:
                raise ValueError(
                    f"{root} is not a readable zip archive ({exc}): download it again"
                ) from exc
            for info in archive.infolist():
                if info.is_dir() or "__MACOSX" in info.filename.split("/"):
                    continue
                files.setdefault(info.filename, _Entry(info.filename, archive=archive))
    hidden = [n for n in files if PurePosixPath(n).name.startswith(".")]
    if hidden:
        log.info("skipping %d hidden files (e.g. %s)", len(hidden), hidden[0])
    return {n: e for n, e in files.items() if not PurePosixPath(n).name.startswith(".")}


def _is_layout(files: Mapping[str, _Entry], original_ok: bool) -> tuple[str | None, dict | None]:
    """(Kaggle prefix or None, original layout parts or None), the shallowest match of each."""
    prefixes = {n.rpartition("/")[0] for n in files}
    kaggle = [
        p
        for p in prefixes
        if PurePosixPath(p).name == IMAGES_DIR
        and _join(p.rpartition("/")[0], CAPTIONS_FILE) in files
    ]
    kaggle_prefix = min(kaggle, key=_depth).rpartition("/")[0] if kaggle else None
    original = None
    if original_ok:
        tokens = [n for n in files if PurePosixPath(n).name == TOKEN_FILE]
        image_dirs = [p for p in prefixes if PurePosixPath(p).name in ORIGINAL_IMAGE_DIRS]
        if tokens and image_dirs:
            token = min(tokens, key=_depth)
            splits = {}
            for split, filename in SPLIT_FILES.items():
                found = [n for n in files if PurePosixPath(n).name == filename]
                if found:
                    splits[split] = min(found, key=_depth)
            original = {"token": token, "images": min(image_dirs, key=_depth), "splits": splits}
    return kaggle_prefix, original


def _copy_kaggle(files: Mapping[str, _Entry], prefix: str, work: Path) -> None:
    log.info("Kaggle layout found at %r", prefix or "the top")
    # captions.txt byte for byte: the validation report's line numbers then match the source
    (work / CAPTIONS_FILE).write_bytes(files[_join(prefix, CAPTIONS_FILE)].read_bytes())
    _copy_images(files, _join(prefix, IMAGES_DIR), work / IMAGES_DIR)


def _copy_original(files: Mapping[str, _Entry], parts: dict, work: Path) -> None:
    log.info("original Flickr8k layout found: %s + %s", parts["images"], parts["token"])
    text = files[parts["token"]].read_bytes().decode("utf-8", errors="replace")
    write_captions(work, _token_rows(text))
    _copy_images(files, parts["images"], work / IMAGES_DIR)
    if len(parts["splits"]) == len(SPLIT_FILES):
        splits = {
            split: [
                line.strip()
                for line in files[name].read_bytes().decode("utf-8", errors="replace").splitlines()
                if line.strip()
            ]
            for split, name in parts["splits"].items()
        }
        (work / SPLITS_FILE).write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
        log.info("official splits: %s", {k: len(v) for k, v in splits.items()})
    else:
        missing = sorted(
            set(SPLIT_FILES.values()) - {Path(n).name for n in parts["splits"].values()}
        )
        log.warning("no official splits written: %s not found", ", ".join(missing))


def _token_rows(text: str) -> list[tuple[str, str]]:
    """`name.jpg#0<TAB>caption` lines -> (image, caption); a malformed line keeps no image name
    so that validation reports it rather than it vanishing here."""
    rows = []
    for line in text.splitlines():
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        if not tab:  # some copies were re-saved with spaces instead of the tab
            key, _, caption = line.partition(" ")
        image = key.rsplit("#", 1)[0].strip() if "#" in key else ""
        if not image or "," in image:
            image, caption = "", line
        rows.append((image, caption.strip()))
    return rows


def _copy_images(files: Mapping[str, _Entry], prefix: str, images_dir: Path) -> None:
    """Hard-link (same filesystem) or copy every file directly inside `prefix`."""
    start = prefix + "/"
    entries = [e for n, e in files.items() if n.startswith(start) and "/" not in n[len(start) :]]
    _copy_entries(entries, images_dir)


def _copy_entries(entries: list[_Entry], images_dir: Path) -> None:
    """Hard-link (same filesystem) or copy each entry into `images_dir`, under its file name."""
    images_dir.mkdir(parents=True, exist_ok=True)
    linked = 0
    for entry in tqdm(entries, desc="images", unit="img"):
        dest = images_dir / PurePosixPath(entry.name).name
        if entry.path is not None:
            try:
                os.link(entry.path, dest)
                linked += 1
            except OSError:  # another filesystem, or links not supported
                shutil.copyfile(entry.path, dest)
            continue
        try:
            with entry.archive.open(entry.name) as src, dest.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            # An empty file: validation then reports this image as unreadable, by name.
            dest.write_bytes(b"")
            log.warning("zip member %s is corrupt (%s); written empty", entry.name, exc)
    log.info("%d images into %s (%d hard-linked)", len(entries), images_dir, linked)


# ------------------------------------------------------------------------------- karpathy

# Karpathy's splits -> ours: `restval` is the part of COCO's val2014 outside his val/test
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def _copy_karpathy(cfg: KarpathyConfig, work: Path) -> None:
    """A Karpathy-split JSON + its images -> captions.txt (the `raw` sentences), splits.json
    and Images/ (flat: the file names are unique in all three datasets)."""
    if not cfg.json or not cfg.images:
        raise ValueError(
            "data.source is karpathy but data.karpathy.json or .images is not set: point json "
            "at dataset_coco.json (or dataset_flickr8k/30k.json) and images at the folder (or "
            "zip) holding the images it names"
        )
    items = _karpathy_items(_existing(cfg.json, "data.karpathy.json"))
    rows, splits, wanted = [], {split: [] for split in SPLIT_FILES}, {}
    for item in items:
        name = item["filename"]
        splits[KARPATHY_SPLITS[item["split"]]].append(name)
        wanted[name] = PurePosixPath(item.get("filepath") or "", name).as_posix()
        rows += [(name, s.get("raw") or " ".join(s.get("tokens", []))) for s in item["sentences"]]
    with ExitStack() as stack:
        files = _list_files([_existing(cfg.images, "data.karpathy.images")], stack)
        by_name: dict[str, list[str]] = {}
        for path in files:
            by_name.setdefault(PurePosixPath(path).name, []).append(path)
        found = {}
        for name, relative in wanted.items():
            candidates = by_name.get(name, [])
            # COCO's `filepath` (train2014/, val2014/) decides when a name is there twice
            best = [c for c in candidates if c == relative or c.endswith("/" + relative)]
            if best or candidates:
                found[name] = files[(best or sorted(candidates, key=_depth))[0]]
        if not found:
            raise FileNotFoundError(
                f"{cfg.images} holds none of the {len(wanted)} images {cfg.json} names (e.g. "
                f"{next(iter(wanted.values()))}): point data.karpathy.images at their folder"
            )
        if len(found) < len(wanted):  # validation reports each of their captions
            log.warning(
                "%d of %d images are not in %s", len(wanted) - len(found), len(wanted), cfg.images
            )
        write_captions(work, rows)
        _copy_entries(list(found.values()), work / IMAGES_DIR)
    (work / SPLITS_FILE).write_text(json.dumps(splits, indent=1) + "\n", encoding="utf-8")
    log.info("Karpathy splits: %s", {k: len(v) for k, v in splits.items()})


def _karpathy_items(path: Path) -> list[dict]:
    """The `images` list of a Karpathy-split file, each item checked for what ingest reads."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["images"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{path} is not a Karpathy-split caption file ({exc!r}): expected JSON "
            '{"images": [{"filename", "split", "sentences": [{"raw"}...]}...]}, as '
            "dataset_coco.json"
        ) from exc
    names = set()
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"filename", "split", "sentences"} <= item.keys():
            raise ValueError(f"{path}: images[{i}] lacks filename, split or sentences")
        if item["split"] not in KARPATHY_SPLITS:
            raise ValueError(
                f"{path}: images[{i}] ({item['filename']}) has split {item['split']!r}; "
                f"expected one of {sorted(KARPATHY_SPLITS)}"
            )
        if item["filename"] in names:
            raise ValueError(f"{path}: {item['filename']} is listed twice")
        names.add(item["filename"])
    return items


def _no_layout_message(roots: list[Path], files: Mapping[str, _Entry], original_ok: bool) -> str:
    where = ", ".join(str(r) for r in roots)
    looked = f"`{IMAGES_DIR}/` + `{CAPTIONS_FILE}` (Kaggle layout)"
    if original_ok:
        looked += (
            f", or `{ORIGINAL_IMAGE_DIRS[0]}/` + `{TOKEN_FILE}` (+ the Flickr_8k.*Images.txt "
            "split files; the original layout, e.g. the two official archives)"
        )
    names = {PurePosixPath(n).name for n in files} | {p for n in files for p in n.split("/")[:-1]}
    hint = ""
    if original_ok and TOKEN_FILE in names:
        hint = f" Found {TOKEN_FILE} but no {ORIGINAL_IMAGE_DIRS[0]}/: add the images archive."
    elif original_ok and names & set(ORIGINAL_IMAGE_DIRS):
        hint = f" Found {ORIGINAL_IMAGE_DIRS[0]}/ but no {TOKEN_FILE}: add Flickr8k_text.zip."
    elif IMAGES_DIR in names:
        hint = f" Found {IMAGES_DIR}/ but no {CAPTIONS_FILE} beside it."
    top = sorted({n.split("/")[0] for n in files})[:10]
    return f"{where} holds no known dataset layout: looked for {looked} at any depth.{hint} " + (
        f"Top-level entries: {top}" if top else "It is empty."
    )


def _existing(path: str, key: str) -> Path:
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(
            f"{key} is {path!r}, which does not exist (resolved from {Path.cwd()}): point it at "
            "the dataset's zip or folder"
        )
    return resolved


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _depth(name: str) -> int:
    return name.count("/")


if __name__ == "__main__":
    main()
