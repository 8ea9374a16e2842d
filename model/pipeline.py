"""One way to caption: `load` a checkpoint with its tokenizer and preprocessing, then `caption`
images with `Decoding` options; captions, scores and, asked, attention come back per image.

    captioner = model.load("artifacts/model/model.pth", device="cpu")
    results = captioner.caption([model.open_image("cat.jpg")], Decoding(num_beams=5))
    results[0].caption, results[0].score, results[0].tokens, results[0].to_json()

The TorchServe handler, `imgtocap caption`, the MLflow model, the evaluate stage and the
benches all caption through here. Decoding bytes or files stays `model.image.open_image`'s job
(the one decoding path); the evaluate stage captions precomputed encoder features with
`caption_features`, the same decoding from the encoder's output on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .captioner import Captioner
from .decoding import Generation
from .domain import DomainCheck, read_beside
from .encoders import pooled
from .int8 import quantize_decoder
from .io import load_checkpoint
from .options import CPU_DECODER, CPU_DECODERS, Decoding
from .tokenizer import decode_caption, load_tokenizer

_DEFAULT = Decoding()  # frozen: one shared default is safe


@dataclass(frozen=True)
class Caption:
    """One image's caption, its score (the length-normalised log-prob; None when not finite:
        JSON has no -inf), its WordPieces and their ids ([CLS]/[SEP] left out) and, when asked,
        where the model looked for each WordPiece: (len(tokens), rows, cols), each row summing to 1;
    and whether the image is like the training images (`in_domain`, its `domain_distance`: both
    None for a model saved without its domain check)."""

    caption: str
    score: float | None
    tokens: list[str]
    ids: list[int]
    attention: torch.Tensor | None = field(default=None, compare=False)  # == of tensors: no bool
    in_domain: bool | None = None
    domain_distance: float | None = None

    def to_json(self) -> dict[str, Any]:
        """The answer the server and `imgtocap caption` give: caption, score (4 decimals),
        in_domain and domain_distance (4 decimals) and, with attention, `{"grid": [rows, cols], "tokens": [{"token", "weights"}, ...]}`, the
        weights row-major, 4 decimals."""
        answer: dict[str, Any] = {
            "caption": self.caption,
            "score": None if self.score is None else round(self.score, 4),
            "in_domain": self.in_domain,
            "domain_distance": None
            if self.domain_distance is None
            else round(self.domain_distance, 4),
        }
        if self.attention is not None:
            rows = [[round(w, 4) for w in row] for row in self.attention.flatten(1).tolist()]
            answer["attention"] = {
                "grid": list(self.attention.shape[1:]),
                "tokens": [
                    {"token": t, "weights": w} for t, w in zip(self.tokens, rows, strict=True)
                ],
            }
        return answer


class CaptionPipeline:
    """A Captioner with its tokenizer and preprocessing (and, when given, its in-domain check):
    images in, `Caption`s out."""

    def __init__(self, model: Captioner, tokenizer: Any, domain: DomainCheck | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.domain = domain

    @property
    def device(self) -> torch.device:
        return self.model.image_proj.weight.device

    def preprocess(self, image: Image.Image | np.ndarray) -> torch.Tensor:
        """An RGB image (PIL, or a decoded (H, W, 3) uint8 array) -> encoder input (3, S, S)."""
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        return self.model.preprocess(image)

    def caption(
        self,
        images: Sequence[Image.Image | np.ndarray],
        decoding: Decoding = _DEFAULT,
        attention: bool = False,
    ) -> list[Caption]:
        """Caption decoded images in one batch. A model without attention over the image grid
        (fusion concat) raises ValueError when `attention` is asked."""
        if not images:
            return []
        pixels = torch.stack([self.preprocess(image) for image in images])  # (B, 3, S, S)
        return self._caption(decoding, attention, pixels=pixels.to(self.device))

    def caption_features(
        self,
        features: np.ndarray | torch.Tensor,
        decoding: Decoding = _DEFAULT,
        attention: bool = False,
    ) -> list[Caption]:
        """Caption precomputed encoder grid features (B, N, C) (the transform stage's, fp16 or
        fp32) in one batch."""
        if isinstance(features, np.ndarray):
            features = torch.from_numpy(np.array(features))  # a copy: memory-maps are read-only
        return self._caption(decoding, attention, grid=features.to(self.device, torch.float32))

    def _caption(
        self, decoding: Decoding, attention: bool, **inputs: torch.Tensor
    ) -> list[Caption]:
        with torch.inference_mode():
            if "pixels" in inputs:  # encoded here: the domain check reads the same grid
                inputs = {"grid": self.model.encode_image(inputs["pixels"])}  # (B, N, C)
            distances = None
            if self.domain is not None:
                distances = self.domain.distance(pooled(inputs["grid"])).tolist()  # (B,)
            out = self.model.generate(
                **inputs,
                num_beams=decoding.num_beams,
                max_length=decoding.max_length,
                length_penalty=decoding.length_penalty,
                no_repeat_ngram_size=decoding.no_repeat_ngram_size,
                return_attention=attention,
            )
        return [self._result(out, k, distances) for k in range(len(out.tokens))]

    def _result(self, out: Generation, k: int, distances: list[float] | None) -> Caption:
        ids, score, attention = out.tokens[k], out.scores[k], None
        if out.attention is not None:
            grid = self.model.encoder.spec.grid
            attention = out.attention[k].reshape(len(ids), grid, grid)  # (T, N) -> (T, g, g)
        return Caption(
            caption=decode_caption(self.tokenizer, ids),
            score=score if math.isfinite(score) else None,
            tokens=self.tokenizer.convert_ids_to_tokens(ids),
            ids=ids,
            attention=attention,
            in_domain=None if distances is None else distances[k] <= self.domain.threshold,
            domain_distance=None if distances is None else distances[k],
        )


def load(
    checkpoint: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | None = None,
    cpu_decoder: str = CPU_DECODER,
) -> CaptionPipeline:
    """A checkpoint's captioner on `device` (in `dtype`; None: as saved), with its tokenizer
    (`tokenizer`: a folder of tokenizer files instead of the checkpoint's named one), its
    preprocessing and the in-domain check saved beside it (model/domain.py), if any. On the CPU
    the decoder runs as `cpu_decoder` says (int8 weights or fp32; a GPU always runs it as
    saved). Never downloads anything."""
    if cpu_decoder not in CPU_DECODERS:
        raise ValueError(f"cpu_decoder must be one of {CPU_DECODERS}, got {cpu_decoder!r}")
    model = load_checkpoint(checkpoint, device)
    if dtype is not None:
        model = model.to(dtype)
    if cpu_decoder == "int8" and torch.device(device).type == "cpu":
        quantize_decoder(model)
    tokenizer = load_tokenizer(tokenizer or model.config.tokenizer)
    return CaptionPipeline(model, tokenizer, read_beside(checkpoint))
