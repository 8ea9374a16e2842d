"""The decoder's linear layers with int8 weights, for captioning on the CPU.

Decoding one caption multiplies a few rows (the beams) by every weight matrix of the decoder at
every step: on a CPU that is bound by reading the weights, not by arithmetic (a 384 x 1536
fp32 layer at 3 rows: 180 us, 6 GFLOP/s). Weights stored as int8 with one scale per output
channel are a quarter of the bytes, and torch's weight-only int8 kernel multiplies them with
bf16 activations: 31 us for that layer (docs/benchmarks.md).

Only the weights are quantised. The activations are not (unlike torch.ao's dynamic
quantisation, which scales each input tensor as a whole), so a row's result does not depend on
the other rows of the batch: a request gets the same caption alone or batched with others, and
evaluate's batches give the captions the server gives.

    quantize_decoder(captioner)      # in place; the encoder, projector and output layer stay fp32
"""

from __future__ import annotations

import torch
from torch import nn


def available() -> bool:
    """Whether this torch has the weight-only int8 kernel (a private op, since torch 2.3)."""
    return hasattr(torch, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """nn.Linear's forward with int8 weights (per output channel, symmetric) and bf16
    activations; the bias and the result stay in the input's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        y = _Int8MatMul.apply(rows, self.weight, self.scale)  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class _Int8MatMul(torch.autograd.Function):
    """rows @ (weight * scale).T with the int8 kernel; its gradient for the rows (the kernel has
    none), which the attention relevance (model/relevance.py) takes through the decoder."""

    @staticmethod
    def forward(ctx, rows, weight, scale):  # (N, in), (out, in) int8, (out,) bf16
        ctx.save_for_backward(weight, scale)
        return torch._weight_int8pack_mm(rows.to(torch.bfloat16), weight, scale).to(rows.dtype)

    @staticmethod
    def backward(ctx, grad):  # (N, out)
        weight, scale = ctx.saved_tensors
        dequantized = weight.to(grad.dtype) * scale.to(grad.dtype)[:, None]  # (out, in)
        return grad @ dequantized, None, None


def quantize_decoder(captioner: nn.Module) -> nn.Module:
    """Replace every nn.Linear inside `captioner.decoder` by an Int8Linear (CPU only); return
    the captioner. Raises RuntimeError where torch lacks the kernel or the model is on a GPU."""
    if not available():
        raise RuntimeError(
            f"torch {torch.__version__} has no weight-only int8 kernel: set params.yaml "
            "serve.cpu_decoder to fp32, or install torch >= 2.3"
        )
    device = next(captioner.decoder.parameters()).device
    if device.type != "cpu":
        raise RuntimeError(f"int8 decoding runs on the CPU; this decoder is on {device}")
    for module in list(captioner.decoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return captioner
