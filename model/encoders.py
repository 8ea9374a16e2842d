"""Frozen image encoders: pixels (B, 3, S, S) -> grid features (B, N, C); pooled = grid mean.

A grid cell holds the CNN's last stage and a middle stage (stride 8-16) brought onto the same
grid: Lite0's stride-16 stage with its 2x2 sub-cells stacked into the cell's channels (space to
depth: a small object's colour is not averaged with the background around it), ResNet-50's
stride-8 stage as the mean of its 4x4 sub-cells (stacked, they would make 8,192 channels). The
captioner balances the two (`CaptionerConfig.mid_scale`). The last stage of an ImageNet
classifier keeps what an object is and drops much of its colour: a linear probe reads a lone
shape's colour from the cell under it far better from Lite0's stride-16 stage than from its
head (bench/probe_layers.py).

Each encoder has ONE preprocessing function (`preprocess`) that training, evaluation and
serving all call. Architectures are defined here (no third-party model code at serving
time); pretrained weights are loaded only when training starts (`load_pretrained`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .image import to_tensor


@dataclass(frozen=True)
class EncoderSpec:
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    last_channels: int  # of the last stage, at stride S / grid
    mid_channels: int  # of the middle stage, as it lands on the grid
    grid: int  # the grid is grid x grid cells: N = grid**2
    mid_stacked: bool = False  # the middle stage's sub-cells stacked (space to depth), else mean

    @property
    def channels(self) -> int:
        """C of the grid features: the last stage's channels, then the middle stage's."""
        return self.last_channels + self.mid_channels


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

SPECS = {
    # layer4 + layer2 (stride 8, after 7 of its 16 blocks)
    "resnet50": EncoderSpec(224, _IMAGENET_MEAN, _IMAGENET_STD, 2048, 512, grid=7),
    # the 1x1 head + stage 4 (stride 16, after 8 of 16 blocks: 80 channels x 2x2 sub-cells);
    # trained on inputs in [-1, 1]
    "efficientnet_lite0": EncoderSpec(
        224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1280, 4 * 80, grid=7, mid_stacked=True
    ),
    "tiny": EncoderSpec(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 32, 16, grid=4),
}


def preprocess(image: Image.Image, encoder: str) -> torch.Tensor:
    """RGB PIL image -> the encoder's input tensor (3, S, S)."""
    spec = SPECS[encoder]
    return to_tensor(image, spec.image_size, spec.mean, spec.std)


class ImageEncoder(nn.Module):
    """A frozen CNN: always in eval mode, never receives gradients."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.spec = SPECS[name]
        self.backbone = _BACKBONES[name]()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(False)  # frozen BatchNorm statistics, whatever the caller says

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        last, mid = self.backbone(pixels)  # (B, C1, g, g), (B, C2, k*g, k*g)
        if self.spec.mid_stacked:
            mid = F.pixel_unshuffle(mid, mid.shape[-1] // last.shape[-1])  # (B, C2*k*k, g, g)
        else:
            mid = F.adaptive_avg_pool2d(mid, last.shape[-2:])  # (B, C2, g, g): k x k means
        return torch.cat([last, mid], dim=1).flatten(2).transpose(1, 2)  # (B, N, C1 + C2)


def pooled(grid: torch.Tensor) -> torch.Tensor:
    """Global average pool of grid features: (B, N, C) -> (B, C), the CNN's own pooled vector."""
    return grid.mean(dim=1)


# --- architectures ----------------------------------------------------------------------


def _resnet50() -> nn.Module:
    from torchvision.models import resnet50

    net = resnet50(weights=None)
    net.avgpool = nn.Identity()
    net.fc = nn.Identity()

    class _Trunk(nn.Module):  # stop at layer4: keep the 7x7 grid
        def __init__(self):
            super().__init__()
            for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
                self.add_module(name, getattr(net, name))

        def forward(self, x):
            x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))  # (B, 256, S/4, S/4)
            mid = self.layer2(x)  # (B, 512, S/8, S/8)
            return self.layer4(self.layer3(mid)), mid  # (B, 2048, S/32, S/32)

    return _Trunk()


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as Lite0 was trained."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excite, ReLU6)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv2d(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


# (repeats, kernel, stride, expand, c_in, c_out): efficientnet_lite_builder.py, lite0
_LITE0_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

_LITE0_MID = 7  # the last block of the 80-channel stage


class _EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 up to its last 1x1 conv; parameter names match the published weights."""

    def __init__(self):
        super().__init__()
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expand, c_in, c_out in _LITE0_BLOCKS:
            for i in range(repeats):
                blocks.append(
                    _MBConv(
                        c_in if i == 0 else c_out, c_out, kernel, stride if i == 0 else 1, expand
                    )
                )
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, S/2, S/2)
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i == _LITE0_MID:
                mid = x  # (B, 80, S/16, S/16)
        return F.relu6(self._bn1(self._conv_head(x))), mid  # (B, 1280, S/32, S/32)


class _Tiny(nn.Sequential):
    """Three random strided convs: 32x32 -> a 4x4 grid of 32 channels; the first's 16 at 16x16."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mid = self[1](self[0](x))  # (B, 16, 16, 16)
        return self[4](self[3](self[2](mid))), mid  # (B, 32, 4, 4)


_BACKBONES = {"resnet50": _resnet50, "efficientnet_lite0": _EfficientNetLite0, "tiny": _Tiny}
