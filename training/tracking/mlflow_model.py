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
        from model import load_checkpoint, load_tokenizer  # from the model's code_paths

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_checkpoint(context.artifacts["checkpoint"], device)
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer"])
        self.defaults = dict(context.model_config or {})  # the decoding the evaluation used

    # MLflow reads predict's hints: a DataFrame hint leaves the input as the logged signature
    # made it (no type-hint schema, no warning about one).
    def predict(
        self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        """Caption every image (column `image`); params: num_beams, max_length, length_penalty."""
        from model import decode_caption, open_image

        settings = {**self.defaults, **{k: v for k, v in (params or {}).items() if v is not None}}
        column = model_input["image"] if isinstance(model_input, pd.DataFrame) else model_input
        images = [_as_bytes(value) for value in column]
        device = self.model.image_proj.weight.device
        captions, scores = [], []
        for start in range(0, len(images), BATCH):
            batch = [self.model.preprocess(open_image(b)) for b in images[start : start + BATCH]]
            out = self.model.generate(
                torch.stack(batch).to(device),  # (B, 3, S, S)
                num_beams=int(settings.get("num_beams", 3)),
                max_length=int(settings.get("max_length", 20)),
                length_penalty=float(settings.get("length_penalty", 1.0)),
            )
            captions += [decode_caption(self.tokenizer, ids) for ids in out.tokens]
            scores += out.scores
        return pd.DataFrame({"caption": captions, "score": scores})


def _as_bytes(value: Any) -> bytes:
    """Image bytes as given, or decoded from base64 (how JSON carries them to `mlflow serve`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return base64.b64decode(value, validate=True)
    raise TypeError(f"expected image bytes or a base64 string, got {type(value).__name__}")


mlflow.models.set_model(CaptionerModel())
