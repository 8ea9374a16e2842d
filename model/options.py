"""Decoding options and the served limits: the one place their defaults are written.

`Captioner.generate`, the caption API (model/pipeline.py), params.yaml's `evaluate:` and
`serve:` sections (EvaluateConfig, ServeConfig) and `imgtocap caption` take them from here.
No torch: the command line reads them before it knows whether it will caption locally.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

# The most a served request may ask for: params.yaml serve.num_beams.max / max_length.max
MAX_BEAMS = 5
MAX_LENGTH = 40
# How the decoder runs on a CPU (model/int8.py): int8 weights (a quarter of the bytes each
# decoding step reads) or fp32. params.yaml serve.cpu_decoder; evaluate captions the same way.
CPU_DECODERS = ("int8", "fp32")
CPU_DECODER = "int8"


@dataclass(frozen=True)
class Decoding:
    """How captions are decoded: the beam width, the generated tokens at most ([SEP] included),
    the length penalty (a score is the summed log-prob / length ** length_penalty) and
    `no_repeat_ngram_size` (n > 0: no n tokens in a row occur twice in a caption, as in
    transformers' generate(); 0: no such rule). Without it, beam search could loop on photos
    unlike the training images: "... a blue blue blue blue blue" (docs/results.md)."""

    num_beams: int = 3
    max_length: int = 20
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 3

    def __post_init__(self) -> None:
        for name, least in (("num_beams", 1), ("max_length", 1), ("no_repeat_ngram_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
