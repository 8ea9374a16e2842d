"""Stand-ins for the two downloaded weight files, written by the tests in the real formats.

- torchvision's resnet50-0676ba61.pth: a plain `torch.save`d ResNet-50 state dict, the
  classifier (fc.*) included;
- bert-base-uncased's model.safetensors (the hub's, revision 86b5e09): a BertForPreTraining
  state dict in fp32 with the original checkpoint's names (LayerNorm `gamma`/`beta`; the hub
  renamed them only in an unmerged PR), the tied decoder weight left out as safetensors does.

Random values at the true shapes (bert: 110M parameters, 440 MB) unless told fewer layers.
"""

from __future__ import annotations

from pathlib import Path

import torch

from training.data.checksums import file_sha256


def write_resnet50(path: Path) -> str:
    """A random ResNet-50 state dict where torchvision's file would be; returns its sha256."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(resnet50(weights=None).state_dict(), path)
    return file_sha256(path)


def write_bert(path: Path, layers: int = 12) -> str:
    """A random bert-base-uncased model.safetensors (`layers` of 12); returns its sha256."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForPreTraining

    with torch.device("meta"):  # names and shapes only; values are filled in below
        layout = BertForPreTraining(BertConfig(num_hidden_layers=layers)).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, tensor in layout.items():
        if name.startswith("cls.predictions.decoder.") or name.endswith("position_ids"):
            continue  # tied to the word embeddings / a buffer: not in the file
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma")
        name = name.replace("LayerNorm.bias", "LayerNorm.beta")
        if name.endswith("gamma"):
            state[name] = torch.ones(tensor.shape)
        else:
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.02
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})
    return file_sha256(path)
