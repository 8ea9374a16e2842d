"""Test helpers for the data stages: tiny Flickr8k look-alikes, a Karpathy-split dataset of real
photographs and a local HTTP file server."""

from __future__ import annotations

import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

# name -> 5 captions; commas inside captions on purpose (the image name ends at the first one)
CAPTIONS = {
    "1000_aaa.jpg": [f"a dog, running {i}" for i in range(5)],
    "2000_bbb.jpg": [f"two kids play in the sand {i}" for i in range(5)],
    "3000_ccc.jpg": [f"a man rides a bike, fast {i}" for i in range(5)],
    "4000_ddd.jpg": [f"a cat sleeps {i}" for i in range(5)],
}
SPLITS = {
    "train": ["1000_aaa.jpg", "2000_bbb.jpg"],
    "val": ["3000_ccc.jpg"],
    "test": ["4000_ddd.jpg"],
}


def tiny_jpeg(seed: int, size: tuple[int, int] = (12, 8)) -> bytes:
    """A small JPEG whose colour depends on `seed` (distinct seeds: distinct bytes)."""
    colour = ((seed * 67) % 256, (seed * 131) % 256, (seed * 29) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def images() -> dict[str, bytes]:
    """The fixture images by name."""
    return {name: tiny_jpeg(i + 1) for i, name in enumerate(CAPTIONS)}


def kaggle_captions_text() -> str:
    """captions.txt as Kaggle writes it: header, then `image,caption` lines, commas unquoted."""
    lines = ["image,caption"] + [f"{n},{c}" for n, caps in CAPTIONS.items() for c in caps]
    return "\n".join(lines) + "\n"


def make_kaggle(root: Path) -> Path:
    """Write the Kaggle layout (Images/ + captions.txt) under `root`."""
    (root / "Images").mkdir(parents=True)
    for name, data in images().items():
        (root / "Images" / name).write_bytes(data)
    (root / "captions.txt").write_text(kaggle_captions_text(), encoding="utf-8")
    return root


def token_text() -> str:
    """Flickr8k.token.txt: `name.jpg#i<TAB>caption`."""
    lines = [f"{n}#{i}\t{c}" for n, caps in CAPTIONS.items() for i, c in enumerate(caps)]
    return "\n".join(lines) + "\n"


def make_original(root: Path) -> Path:
    """Write the original layout: Flicker8k_Dataset/, the token file and the split files."""
    (root / "Flicker8k_Dataset").mkdir(parents=True)
    for name, data in images().items():
        (root / "Flicker8k_Dataset" / name).write_bytes(data)
    (root / "Flickr8k.token.txt").write_text(token_text(), encoding="utf-8")
    (root / "Flickr8k.lemma.token.txt").write_text("not used\n", encoding="utf-8")
    for split, filename in (
        ("train", "Flickr_8k.trainImages.txt"),
        ("val", "Flickr_8k.devImages.txt"),
        ("test", "Flickr_8k.testImages.txt"),
    ):
        (root / filename).write_text("\n".join(SPLITS[split]) + "\n", encoding="utf-8")
    return root


def zip_dir(src: Path, dest: Path, top: str = "", extra: dict[str, bytes] | None = None) -> Path:
    """Zip every file under `src` (inside folder `top` when given) plus `extra` members."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(src.rglob("*")):
            if path.is_file():
                name = path.relative_to(src).as_posix()
                archive.write(path, f"{top}/{name}" if top else name)
        for name, data in (extra or {}).items():
            archive.writestr(name, data, compress_type=zipfile.ZIP_STORED)
    return dest


def official_archives(tmp: Path, padding: int = 0) -> tuple[bytes, bytes]:
    """(Flickr8k_Dataset.zip, Flickr8k_text.zip) bytes laid out like the official downloads.

    `padding` random-ish bytes, stored uncompressed beside the images, make the archive big
    enough for a download to be cut in the middle.
    """
    tree = make_original(tmp / "original")
    image_zip = tmp / "Flickr8k_Dataset.zip"
    extra = {"__MACOSX/Flicker8k_Dataset/._1000_aaa.jpg": b"\x00\x05\x16\x07 apple double"}
    if padding:
        extra["padding.bin"] = bytes((i * 7919) % 251 for i in range(padding))
    with zipfile.ZipFile(image_zip, "w") as archive:
        for path in sorted((tree / "Flicker8k_Dataset").iterdir()):
            archive.write(path, f"Flicker8k_Dataset/{path.name}")
        for name, data in extra.items():
            archive.writestr(name, data)
    text_zip = tmp / "Flickr8k_text.zip"
    with zipfile.ZipFile(text_zip, "w") as archive:
        for path in sorted(tree.glob("*.txt")):
            archive.write(path, path.name)
    return image_zip.read_bytes(), text_zip.read_bytes()


class FileServer:
    """Threaded HTTP/1.1 server on 127.0.0.1 (a free port) serving bytes, with Range support.

    `cut_first`: name -> n; the first response for that name sends n body bytes, then drops
    the connection. `requests` logs (name, Range header or None) for every GET.
    """

    def __init__(self, files: dict[str, bytes], cut_first: dict[str, int] | None = None):
        self.files = files
        self.cut_first = dict(cut_first or {})
        self.requests: list[tuple[str, str | None]] = []

    def __enter__(self) -> FileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                requested = self.headers.get("Range")
                server.requests.append((name, requested))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404)
                    return
                start = int(requested.removeprefix("bytes=").split("-")[0]) if requested else 0
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if requested:
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/zip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = server.cut_first.pop(name, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def real_photos() -> dict[str, Image.Image]:
    """Real photographs that ship inside packages: scikit-image's samples (one greyscale) and
    matplotlib's portrait of Grace Hopper."""
    import matplotlib
    from skimage import data

    photos = {n: Image.fromarray(getattr(data, n)()) for n in ("astronaut", "coffee", "chelsea")}
    photos["rocket"] = Image.fromarray(data.rocket())
    photos["camera"] = Image.fromarray(data.camera())  # greyscale
    sample = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    photos["grace_hopper"] = Image.open(sample)
    return photos


# photo -> (Karpathy split, five captions)
KARPATHY = {
    "astronaut": (
        "train",
        [f"an astronaut in a white suit poses with a flag {i}" for i in range(5)],
    ),
    "coffee": ("restval", [f"a cup of coffee on a saucer with a spoon {i}" for i in range(5)]),
    "chelsea": ("val", [f"a tabby cat looks to the side {i}" for i in range(5)]),
    "rocket": ("test", [f"a rocket stands on the launch pad {i}" for i in range(5)]),
    "camera": ("restval", [f"a man with a camera on a tripod, in a field {i}" for i in range(5)]),
    "grace_hopper": ("train", [f"a woman in a navy uniform smiles {i}" for i in range(5)]),
}


def make_karpathy(root: Path, coco: bool = True) -> tuple[Path, Path]:
    """(dataset json, image folder) in the Karpathy-split format, on real photographs.

    `coco`: dataset_coco.json with `filepath` (train2014/ or val2014/, restval among val2014's)
    and COCO's file names; else dataset_flickr30k.json with a flat folder of `<id>.jpg`."""
    images = root / ("coco" if coco else "flickr30k-images")
    items = []
    for i, (photo, image) in enumerate(real_photos().items()):
        split, captions = KARPATHY[photo]
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{i + 1:012d}.jpg" if coco else f"{1000092795 + i}.jpg"
        path = images / folder / name if coco else images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.convert("RGB").save(path, quality=90)
        sentences = [
            {"tokens": c.split(), "raw": c.capitalize() + ".", "imgid": i, "sentid": 5 * i + j}
            for j, c in enumerate(captions)
        ]
        item = {"filename": name, "imgid": i, "split": split, "sentences": sentences}
        item["sentids"] = [s["sentid"] for s in sentences]
        if coco:
            item.update(filepath=folder, cocoid=i + 1)
        items.append(item)
    dataset = root / ("dataset_coco.json" if coco else "dataset_flickr30k.json")
    dataset.write_text(json.dumps({"images": items, "dataset": "coco" if coco else "flickr30k"}))
    return dataset, images
