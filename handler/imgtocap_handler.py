"""TorchServe handler: image bytes in, caption JSON out, batched; a bad request fails alone.

Everything it loads travels inside the .mar (see training/stages/package.py): the checkpoint, the
tokenizer files, handler.json and the captioner's own code (`model/`), so the serving Python
needs torch, torchvision, transformers and pillow, not imgtocap.

A request is the raw image as the body (`curl -T img.jpg`), a multipart field `data` or `file`,
or a JSON body `{"data": "<base64 image>"}`. `num_beams`, `max_length`, `no_repeat_ngram_size` and `attention` come
from form fields, the JSON body, or the query string where TorchServe 0.12 forwards it
(/invocations, not /predictions). `attention=true` (or 1) adds where the model looked for each
WordPiece: `"attention": {"grid": [rows, cols], "tokens": [{"token": "red", "weights": [rows *
cols floats, row-major]}, ...]}` ([SEP] left out).
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import logging
import os
import sys
import time
from http import HTTPStatus
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("data", "file", "body")  # multipart fields first, then the raw body
PARAMS = ("num_beams", "max_length", "no_repeat_ngram_size", "attention")
TRUE, FALSE = ("true", "1"), ("false", "0")
HOW_TO_SEND = (
    "send the image file as the request body (curl -T image.jpg URL) "
    "or as the multipart field 'data' or 'file'"
)


class ImgtocapHandler(BaseHandler):
    """Caption a batch of images; each request gets its own JSON answer or error."""

    def initialize(self, context: Any) -> None:
        """Load the archive's checkpoint, tokenizer and settings onto the worker's device."""
        properties = context.system_properties
        model_dir = Path(properties["model_dir"])
        self.lib = _import_archive_model(model_dir)
        self.settings = json.loads((model_dir / "handler.json").read_text())
        self.limits = {key: self.settings[key]["max"] for key in ("num_beams", "max_length")}
        # the registered version the package stage stamped: every answer says which model gave it
        self.version = context.manifest["model"].get("modelVersion")
        workers = (context.model_yaml_config or {}).get("maxWorkers", 1)
        self.device = _device(properties.get("gpu_id"), self.settings["cpu_threads"], workers)
        checkpoint = model_dir / context.manifest["model"]["serializedFile"]
        # an archive packaged before serve.cpu_decoder existed ran its decoder in fp32
        self.cpu_decoder = self.settings.get("cpu_decoder", "fp32")
        self.captioner = self.lib.load(
            checkpoint, self.device, tokenizer=model_dir / "tokenizer", cpu_decoder=self.cpu_decoder
        )
        # The first caption pays for lazy kernel set-up: pay it here, not in a user's request.
        blank = Image.new("RGB", (32, 32), "white")
        self.captioner.caption([blank], self.lib.Decoding(num_beams=1, max_length=2))
        self.initialized = True
        log.info(
            "imgtocap ready on %s (%d threads): %s encoder, %s decoder, model code from %s",
            self.device,
            torch.get_num_threads(),
            self.captioner.model.config.encoder,
            self.cpu_decoder if self.device.type == "cpu" else "fp32",
            Path(self.lib.__file__).parent,
        )

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[str]:
        """Every request is a caption request (BaseHandler's explain/describe paths don't apply)."""
        start = time.perf_counter()
        self.context = context
        output = self.postprocess(self.inference(self.preprocess(data)))
        elapsed_ms = round((time.perf_counter() - start) * 1000, 2)
        context.metrics.add_time("HandlerTime", elapsed_ms, None, "ms")
        return output

    def preprocess(self, data: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Decode each request to an image + parameters, or to {"status", "error"} if it is bad."""
        return [self._decode(row) for row in data]

    def inference(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Caption the decoded images: one batch per decoding (num_beams, max_length)."""
        groups: dict[Any, list[int]] = {}
        for i, item in enumerate(items):
            if "image" in item:
                groups.setdefault(item["decoding"], []).append(i)
        results = list(items)  # errors pass through in place
        for decoding, indices in groups.items():
            start = time.perf_counter()
            # one call for the group: asking for attention leaves the captions as they are
            attention = any(items[i]["attention"] for i in indices)
            captions = self.captioner.caption(
                [items[i]["image"] for i in indices], decoding, attention
            )
            elapsed_ms = round((time.perf_counter() - start) * 1000, 1)
            for i, caption in zip(indices, captions, strict=True):
                if not items[i]["attention"]:
                    caption = dataclasses.replace(caption, attention=None)
                answer = caption.to_json()  # caption, score (mean log-prob per token), attention
                results[i] = {
                    "caption": answer.pop("caption"),
                    "score": answer.pop("score"),
                    "num_beams": decoding.num_beams,
                    "max_length": decoding.max_length,
                    "inference_ms": elapsed_ms,
                    "batch_size": len(items),  # requests TorchServe handed over together
                    "model_version": self.version,
                    "limits": self.limits,  # what a request may ask: the page's fields obey it
                    **answer,  # in_domain, domain_distance; the attention, when asked: last
                }
        return results

    def postprocess(self, results: list[dict[str, Any]]) -> list[str]:
        """One JSON body per request; a failed one gets its own status code."""
        bodies = []
        for i, result in enumerate(results):
            self.context.set_response_content_type(i, "application/json")
            if "error" in result:
                status = result["status"]
                # the standard phrase: an arbitrary message can't travel in an HTTP status line
                self.context.set_response_status(status, HTTPStatus(status).phrase, idx=i)
                log.info(
                    "refused request %d/%d (%d): %s", i + 1, len(results), status, result["error"]
                )
                result = {"error": result["error"]}
            bodies.append(json.dumps(result))
        return bodies

    def _decode(self, row: dict[str, Any]) -> dict[str, Any]:
        """One request -> {"image", "decoding", "attention"} or {"status", "error"}."""
        try:
            image, params = _unpack(row)
            decoding = self.lib.Decoding(
                num_beams=_bounded(params, "num_beams", self.settings["num_beams"]),
                max_length=_bounded(params, "max_length", self.settings["max_length"]),
                no_repeat_ngram_size=_bounded(
                    params,
                    "no_repeat_ngram_size",
                    {
                        "default": self.settings["no_repeat_ngram_size"],
                        "max": self.settings["max_length"]["max"],
                    },
                    least=0,
                ),
            )
            attention = _flag(params, "attention")
            if attention:
                self.captioner.model.require_attention()
        except ValueError as exc:
            return {"status": 400, "error": str(exc)}
        limit = self.settings["max_image_bytes"]
        if len(image) > limit:
            return {
                "status": 413,
                "error": f"the image is {len(image):,} bytes; the limit is {limit:,} bytes "
                f"({limit / 2**20:.1f} MiB): downscale or recompress it",
            }
        try:
            picture = self.lib.open_image(image, max_pixels=self.settings["max_pixels"])
        except self.lib.UnsupportedFormat as exc:
            return {"status": 415, "error": str(exc)}
        except self.lib.ImageError as exc:
            return {"status": 400, "error": str(exc)}
        return {"image": picture, "decoding": decoding, "attention": attention}


def _import_archive_model(model_dir: Path) -> ModuleType:
    """Import the captioner package shipped in the archive, ahead of anything else on sys.path.

    Imported here rather than at the top of the file: TorchServe reports an ImportError raised
    while importing a handler module as "No module named ts.torch_handler...", hiding the cause.
    TorchServe puts model_dir on PYTHONPATH, but after any PYTHONPATH the user set, where a
    checkout or an install of imgtocap could shadow the code the checkpoint was packaged with.
    """
    sys.path.insert(0, str(model_dir))
    lib = importlib.import_module("model")
    if Path(lib.__file__).resolve().parent != (model_dir / "model").resolve():
        raise ImportError(
            f"`import model` found {lib.__file__}, not the archive's copy in {model_dir}: "
            "the worker imported another `model` module first"
        )
    return lib


def _unpack(row: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """A request's image bytes and its parameters (query string, form fields or JSON body)."""
    params = {name: row[name] for name in PARAMS if name in row}
    body = row.get("body")
    if isinstance(body, dict):  # Content-Type: application/json, decoded by TorchServe
        params = {**{name: body[name] for name in PARAMS if name in body}, **params}
        encoded = body.get("data", body.get("image"))
        if not isinstance(encoded, str):
            raise ValueError(
                'a JSON body must hold the base64-encoded image as "data": '
                f'{{"data": "<base64>", "num_beams": 3}}; or {HOW_TO_SEND}'
            )
        try:
            return base64.b64decode(encoded, validate=True), params
        except ValueError as exc:  # binascii.Error
            raise ValueError(f'"data" is not valid base64 ({exc}); or {HOW_TO_SEND}') from exc
    image = next((row[name] for name in IMAGE_FIELDS if row.get(name) is not None), None)
    if isinstance(image, str):  # a text/* Content-Type made TorchServe decode it
        image = image.encode("utf-8")
    if not isinstance(image, (bytes, bytearray)):
        raise ValueError(f"no image in the request: {HOW_TO_SEND}")
    return bytes(image), params


def _bounded(params: dict[str, Any], name: str, spec: dict[str, int], least: int = 1) -> int:
    """The request's integer parameter `name` within least..spec["max"], or spec["default"]."""
    value = params.get(name)
    if value is None:
        return spec["default"]
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    text = text.strip()
    if not (text.isascii() and text.isdecimal() and least <= int(text) <= spec["max"]):
        raise ValueError(
            f"{name} must be an integer from {least} to {spec['max']} (default {spec['default']}), "
            f"got {text[:20]!r}"
        )
    return int(text)


def _flag(params: dict[str, Any], name: str) -> bool:
    """The request's yes/no parameter `name`: true/1 or false/0 (a JSON boolean too); no."""
    value = params.get(name)
    if value is None or isinstance(value, bool):
        return bool(value)
    text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
    text = text.strip().lower()
    if text not in TRUE + FALSE:
        raise ValueError(f"{name} must be true or false (or 1 or 0), got {text[:20]!r}")
    return text in TRUE


def _device(gpu_id: int | None, cpu_threads: int, workers: int) -> torch.device:
    """The GPU TorchServe assigned to this worker, else the CPU with a thread count that fits."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id}")
    threads = cpu_threads or max(1, _available_cpus() // max(1, int(workers)))
    torch.set_num_threads(threads)
    if threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        log.warning(
            "OMP_WAIT_POLICY is not PASSIVE: %d spinning OpenMP threads slow generation down "
            "many times whenever another process holds a CPU; start TorchServe with "
            "OMP_WAIT_POLICY=PASSIVE in its environment",
            threads,
        )
    return torch.device("cpu")


def _available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 quota (a pod's limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity mask is the limit
    return cpus or 1
