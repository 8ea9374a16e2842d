"""`imgtocap caption`: caption image files and folders, locally from a checkpoint or through a
running server; one JSON line per image.

    imgtocap caption photos/ cat.jpg                        # artifacts/model/model.pth
    imgtocap caption photos/ --checkpoint model.pth --num-beams 5 --output captions.jsonl
    imgtocap caption photos/ --url http://127.0.0.1:8080 --attention maps/

Folders are searched recursively for image files (by extension); a file named on the command
line is tried whatever its extension. Each image gets a line `{"path", "caption", "score"}` on
stdout (or --output); one that cannot be captioned gets `{"path", "error"}` and a message on
stderr, and the rest go on; the exit status is 1 if any failed. A progress bar goes to stderr.

Locally, images are decoded and preprocessed by the same functions training and the server use
(`model.open_image`, `Captioner.preprocess`) and captioned in batches. With --url each image is
POSTed to /predictions/imgtocap: the raw bytes as `application/octet-stream`, or a multipart
form (field `data` plus `num_beams`, `max_length`, `attention`) when options are given, since
TorchServe ignores the query string there. --attention DIR writes a heat-map PNG per image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from tqdm import tqdm

from model.options import Decoding
from training.paths import FINETUNED_PATH, MODEL_NAME, REGISTERED_PATH

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
TOKEN_ENV = "IMGTOCAP_TOKEN"
PREDICTIONS = f"/predictions/{MODEL_NAME}"


@dataclass(frozen=True)
class Job:
    """An image to caption, and where its heat-map goes under --attention (relative)."""

    path: Path
    name: Path


class UsageError(Exception):
    """Nothing can be captioned (a bad option, no checkpoint, no server): `main` says why and
    exits with status 2, as argparse does for a usage error."""


def main(argv: list[str] | None = None) -> int:
    """The `imgtocap` console script."""
    parser = _parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        return caption(parser.parse_args(_token_glued(argv, parser.caption_options)))
    except UsageError as exc:
        print(f"imgtocap: {exc}", file=sys.stderr)
        return 2


def _token_glued(argv: list[str], options: frozenset[str]) -> list[str]:
    """`--token -k3y` as `--token=-k3y`: a TorchServe key can start with "-", and argparse would
    take it for an option and stop. One of caption's own options stays one (no key was given)."""
    glued: list[str] = []
    for arg in argv:
        if glued and glued[-1] == "--token" and arg.startswith("-") and arg not in options:
            glued[-1] = f"--token={arg}"
        else:
            glued.append(arg)
    return glued


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgtocap", description="imgtocap's command line")
    commands = parser.add_subparsers(dest="command", required=True)
    cap = commands.add_parser(
        "caption",
        help="caption image files and folders; one JSON line per image",
        description="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cap.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image files or folders")
    source = cap.add_mutually_exclusive_group()
    source.add_argument(
        "--checkpoint",
        type=Path,
        help=f"caption locally with this model (default: {FINETUNED_PATH})",
    )
    source.add_argument(
        "--url",
        help=f"caption through a running server, e.g. http://127.0.0.1:8080 ({PREDICTIONS} "
        "is added unless the URL has a path)",
    )
    cap.add_argument(
        "--token", help=f"the server's inference token (default: ${TOKEN_ENV}); with --url only"
    )
    cap.add_argument(
        "--num-beams",
        type=int,
        help=f"beam width (default: {Decoding.num_beams}; --url: the server's)",
    )
    cap.add_argument(
        "--max-length",
        type=int,
        help=f"tokens at most (default: {Decoding.max_length}; --url: the server's)",
    )
    cap.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        help="no n-gram of this many tokens twice in a caption, 0: off (default: "
        f"{Decoding.no_repeat_ngram_size}; --url: the server's)",
    )
    cap.add_argument("--batch-size", type=int, default=8, help="images per batch, locally")
    cap.add_argument("--device", default="auto", help="auto | cpu | cuda[:N], locally")
    cap.add_argument("--attention", type=Path, metavar="DIR", help="write a heat-map PNG per image")
    cap.add_argument("--output", type=Path, metavar="FILE", help="JSON lines here, not stdout")
    parser.caption_options = frozenset(cap._option_string_actions)  # type: ignore[attr-defined]
    return parser


def caption(args: argparse.Namespace) -> int:
    """Caption every image under args.paths; 0 if all succeeded, 1 if any failed."""
    for name in ("num_beams", "max_length", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            _fail(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.no_repeat_ngram_size is not None and args.no_repeat_ngram_size < 0:
        _fail(f"--no-repeat-ngram-size must be >= 0, got {args.no_repeat_ngram_size}")
    if args.token and not args.url:
        _fail("--token is for --url (a server); a local checkpoint needs none")
    captioner = _Server(args) if args.url else _Local(args)
    jobs, missing = find_images(args.paths)
    failed = 0
    out: TextIO = args.output.open("w", encoding="utf-8") if args.output else sys.stdout
    try:
        with tqdm(total=len(jobs) + len(missing), unit="img", file=sys.stderr) as bar:
            for path in missing:
                failed += _emit(out, {"path": str(path), "error": "no such file or folder"})
                bar.update()
            for start in range(0, len(jobs), captioner.batch_size):
                batch = jobs[start : start + captioner.batch_size]
                for job, result in zip(batch, captioner.caption(batch), strict=True):
                    attention = result.pop("attention", None)
                    if attention is not None and args.attention:
                        result["attention_png"] = str(_draw(job, result, attention, args.attention))
                    failed += _emit(out, result)
                    bar.update()
    finally:
        if args.output:
            out.close()
    if failed:
        print(f"imgtocap: {failed} of {len(jobs) + len(missing)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


def find_images(paths: list[Path]) -> tuple[list[Job], list[Path]]:
    """The image files named or found (recursively, by extension) under `paths`, each once,
    in the order given (folders sorted); and the paths that do not exist."""
    jobs: dict[Path, Job] = {}
    missing = []
    for path in paths:
        if path.is_dir():
            for file in sorted(_walk(path)):
                jobs.setdefault(file.resolve(), Job(file, path.name / file.relative_to(path)))
        elif path.exists():
            jobs.setdefault(path.resolve(), Job(path, Path(path.name)))
        else:
            missing.append(path)
    return list(jobs.values()), missing


def _walk(folder: Path) -> Iterator[Path]:
    for root, _, files in os.walk(folder):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / name


def _emit(out: TextIO, result: dict[str, Any]) -> int:
    """Write one JSON line; an error also goes to stderr. Returns 1 for an error, else 0."""
    out.write(json.dumps(result) + "\n")
    out.flush()
    if "error" in result:
        tqdm.write(f"imgtocap: {result['path']}: {result['error']}", file=sys.stderr)
        return 1
    return 0


def _fail(message: str) -> NoReturn:
    raise UsageError(message)


class _Local:
    """Captions with a checkpoint in this process, a batch at a time."""

    def __init__(self, args: argparse.Namespace):
        path = args.checkpoint or FINETUNED_PATH
        if not path.is_file():
            _fail(
                f"no checkpoint at {path}: pass --checkpoint FILE (e.g. "
                f"{FINETUNED_PATH} after `dvc repro`), or --url URL of a running server"
            )
        from model import load  # torch: only once there is work
        from training.params import pick_device

        self.captioner = load(path, pick_device(args.device))
        self.version = _local_version(path)
        self.batch_size = args.batch_size
        self.decoding = Decoding(
            num_beams=args.num_beams or Decoding.num_beams,
            max_length=args.max_length or Decoding.max_length,
            no_repeat_ngram_size=Decoding.no_repeat_ngram_size
            if args.no_repeat_ngram_size is None
            else args.no_repeat_ngram_size,
        )
        self.attention = args.attention is not None
        if self.attention:
            try:
                self.captioner.model.require_attention()  # a concat model: say so before work
            except ValueError as exc:
                _fail(f"--attention: {exc}")

    def caption(self, batch: list[Job]) -> list[dict[str, Any]]:
        from model import ImageError, open_image

        results: list[dict[str, Any]] = []
        images, ok = [], []
        for job in batch:
            try:
                images.append(open_image(job.path))
                ok.append(len(results))
                results.append({"path": str(job.path)})
            except (ImageError, OSError) as exc:
                results.append({"path": str(job.path), "error": str(exc)})
        captions = self.captioner.caption(images, self.decoding, self.attention)
        for i, caption in zip(ok, captions, strict=True):
            # caption, score, in_domain, domain_distance; attention when asked
            results[i].update(caption.to_json(), model_version=self.version)
        return results


def _local_version(checkpoint: Path) -> str:
    """The version the served archive is stamped with (`local-3` from a local MLflow store):
    registered.json beside the checkpoint, or the one `track` wrote for the pipeline's model
    (artifacts/model/registered.json); "unregistered" when there is none."""
    from training.tracking.registry import Registered  # imports mlflow: only when captioning

    registered = checkpoint.with_name(REGISTERED_PATH.name)
    if not registered.is_file() and checkpoint == FINETUNED_PATH:
        registered = REGISTERED_PATH
    return Registered.load(registered).archive_version()


class _Server:
    """Captions through TorchServe's inference API, one request per image."""

    batch_size = 1

    def __init__(self, args: argparse.Namespace):
        import requests

        self.requests = requests
        url = args.url.rstrip("/")
        self.url = url if urllib.parse.urlsplit(url).path else url + PREDICTIONS
        token = args.token or os.environ.get(TOKEN_ENV)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.form = {
            name: str(value)
            for name, value in (
                ("num_beams", args.num_beams),
                ("max_length", args.max_length),
                ("no_repeat_ngram_size", args.no_repeat_ngram_size),
            )
            if value is not None
        }
        if args.attention is not None:
            self.form["attention"] = "true"

    def caption(self, batch: list[Job]) -> list[dict[str, Any]]:
        return [self._one(job) for job in batch]

    def _one(self, job: Job) -> dict[str, Any]:
        try:
            data = job.path.read_bytes()
        except OSError as exc:
            return {"path": str(job.path), "error": f"cannot read it: {exc}"}
        try:
            if self.form:  # TorchServe reads options from form fields, not the query string
                files = {"data": (job.path.name, data, "application/octet-stream")}
                response = self.requests.post(
                    self.url, files=files, data=self.form, headers=self.headers, timeout=300
                )
            else:  # urllib/requests would label raw bytes form-encoded: TorchServe then fails
                headers = {**self.headers, "Content-Type": "application/octet-stream"}
                response = self.requests.post(self.url, data=data, headers=headers, timeout=300)
        except self.requests.ConnectionError as exc:
            _fail(f"cannot reach {self.url} ({exc}): is the server running?")
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or "caption" not in body:
            reason = str(body.get("error") or body.get("message") or response.text[:200])
            if "token" in reason.lower() and not self.headers:
                reason += f" (pass --token, or set ${TOKEN_ENV})"
            return {"path": str(job.path), "error": f"HTTP {response.status_code}: {reason}"}
        result = {"path": str(job.path), "caption": body["caption"], "score": body.get("score")}
        for key in ("in_domain", "domain_distance", "model_version", "attention"):
            if key in body:
                result[key] = body[key]
        return result


def _draw(job: Job, result: dict[str, Any], attention: dict[str, Any], folder: Path) -> Path:
    """The heat-map PNG of one image: folder/<its name, suffix .png> (a.jpg -> a.png)."""
    import numpy as np

    from model import open_image
    from training.evaluation.attention_plot import Attended, render_attention

    tokens, (rows, cols) = attention["tokens"], attention["grid"]
    weights = np.array([t["weights"] for t in tokens], dtype=np.float32)
    example = Attended(
        name=str(job.path),
        image=open_image(job.path),
        caption=result["caption"],
        tokens=[t["token"] for t in tokens],
        weights=weights.reshape(len(tokens), rows * cols),
        grid=rows,
    )
    out = folder / job.name.with_suffix(".png")
    return render_attention([example], out, "Where the model looks for each word")


if __name__ == "__main__":
    sys.exit(main())
