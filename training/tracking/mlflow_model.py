"""The registered MLflow model: an imgtocap checkpoint as a pyfunc that captions images.

Logged as "models from code" (training/tracking/registry.py): MLflow stores this file itself, the
checkpoint, the tokenizer files and the `model/` package, and runs this file when the model is
loaded. Nothing is pickled, and loading needs torch, transformers, pillow and mlflow, not
imgtocap: keep imports here to those and to `model`.

    m = mlflow.pyfunc.load_model("models:/imgtocap-synthetic@champion")
    m.predict(pd.DataFrame({"image": [open("cat.jpg", "rb").read()]}), params={"num_beams": 5})
    # -> DataFrame with columns caption, score
"""

from __future__ import annotations

import base64
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.pyfunc import PythonModelContext

BATCH = 16  # images captioned together: bounds memory for large inputs


class CaptionerModel(mlflow.pyfunc.PythonModel):
    """Image bytes (column `image`; base64 strings accepted) -> caption and its score."""

    def load_context(self, context: PythonModelContext) -> None:
        """Rebuild the captioner and its tokenizer from the logged artifacts (never downloads)."""
        from model import load  # from the model's code_paths
        from model.domain import DomainCheck

        device = "cuda" if torch.cuda.is_available() else "cpu"
        artifacts = context.artifacts
        self.defaults = dict(context.model_config or {})  # the decoding the evaluation used
        # the decoder as TorchServe runs it on a CPU (a model logged before the setting: fp32)
        cpu_decoder = self.defaults.pop("cpu_decoder", "fp32")
        self.captioner = load(
            artifacts["checkpoint"],
            device,
            tokenizer=artifacts["tokenizer"],
            cpu_decoder=cpu_decoder,
        )
        if "domain" in artifacts:  # MLflow keeps each artifact apart: not beside the checkpoint
            self.captioner.domain = DomainCheck.read(artifacts["domain"])

    # MLflow reads predict's hints: a DataFrame hint leaves the input as the logged signature
    # made it (no type-hint schema, no warning about one).
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Caption every image (column `image`); params: num_beams, max_length, length_penalty,
        no_repeat_ngram_size. A score that is not finite is None; in_domain and domain_distance
        say whether the image is like the training images (None for a model logged without its
        domain check)."""
        from model import Decoding, open_image

        settings = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        decoding = Decoding(
            num_beams=int(settings.get("num_beams", Decoding.num_beams)),
            max_length=int(settings.get("max_length", Decoding.max_length)),
            length_penalty=float(settings.get("length_penalty", Decoding.length_penalty)),
            no_repeat_ngram_size=int(
                settings.get("no_repeat_ngram_size", Decoding.no_repeat_ngram_size)
            ),
        )
        column = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        images = [_as_bytes(value) for value in column]
        results = []
        for start in range(0, len(images), BATCH):
            batch = [open_image(data) for data in images[start : start + BATCH]]
            results += self.captioner.caption(batch, decoding)
        return pd.DataFrame(
            {
                "caption": [r.caption for r in results],
                "score": [r.score for r in results],
                "in_domain": [r.in_domain for r in results],
                "domain_distance": [r.domain_distance for r in results],
            }
        )


def _as_bytes(value: Any) -> bytes:
    """Image bytes as given, or decoded from base64 (how JSON carries them to `mlflow serve`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise TypeError(f"expected image bytes or a base64 string, got {type(value).__name__}")


mlflow.models.set_model(CaptionerModel())
