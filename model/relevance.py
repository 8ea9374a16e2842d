"""Relevance of the image grid to each generated word: Chefer et al., ICCV 2021, "Generic
Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers".

Raw cross-attention (`captioner.attention_map`, the mean of all layers and heads) says where a
layer's queries looked, not what the word depended on: a head may look at the other object to
rule it out. Here every attention map is weighted by the gradient of the chosen token's logit
with respect to it, heads are averaged keeping only the positive part, and the result is
propagated through the layers: decoder self-attention mixes what earlier tokens drew from the
image into the current one (rule 6 of the paper), and each cross-attention adds its own
gradient-weighted map (rule 10; the image memory has no self-attention of its own, so its
relevance stays the identity). One forward and one backward pass per caption: each token's
step is a row of one batch (bench/attention.py measures the cost and the pointing game).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .captioner import Captioner
    from .decoder import Attention


def relevance(model: Captioner, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """grid (B, N, C), tokens (B, T+1) = [CLS] + chosen tokens -> (B, T, N): row t the image
    relevance for choosing tokens[:, t+1], non-negative and summing to 1 over the N cells
    (uniform where no cell has positive relevance)."""
    model.require_attention()
    inputs, chosen = tokens[:, :-1], tokens[:, 1:]  # (B, T) each
    if model.config.output_vocab is not None:
        chosen = model.output_index[chosen]  # vocab id -> output column
    chosen = chosen.clamp(min=0)  # padding after a caption (-100): rows nobody reads
    B, T = inputs.shape
    # gradients are needed even under the caption API's inference_mode; only the attention
    # maps are leaves that take them, no parameter does
    with torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            context = model.image_context(grid.clone()).repeat_interleave(T, 0)  # (B*T, N, H)
            cross = model._cross_keys_values(context)  # per layer (B*T, nh, N, hs)
        rows = inputs.clone().repeat_interleave(T, 0)  # (B*T, T): row b*T + t explains step t
        step = torch.arange(T, device=tokens.device).repeat(B)  # (B*T,)
        chosen = chosen.clone().reshape(-1)  # (B*T,) a normal tensor: autograd may save it
        hidden, maps = _forward(model, rows, cross)  # maps: per layer (self, cross)
        logits = model._logits(hidden, context)  # (B*T, T, V')
        picked = logits[torch.arange(B * T), step, chosen]  # (B*T,)
        leaves = [a for pair in maps for a in pair]
        grads = torch.autograd.grad(picked.sum(), leaves)
    R_tt = torch.eye(T, device=tokens.device).expand(B * T, T, T)  # (B*T, T, T)
    R_ti = torch.zeros(B * T, T, context.shape[1], device=tokens.device)  # (B*T, T, N)
    for i in range(0, len(leaves), 2):
        cam = _weighted(leaves[i], grads[i])  # self-attention (B*T, T, T)
        R_tt = R_tt + cam @ R_tt
        R_ti = R_ti + cam @ R_ti
        cam = _weighted(leaves[i + 1], grads[i + 1])  # cross-attention (B*T, T, N)
        R_ti = R_ti + _without_residual(R_tt).transpose(1, 2) @ cam
    r = R_ti[torch.arange(B * T), step].view(B, T, -1)  # (B, T, N): each row's own step
    total = r.sum(-1, keepdim=True)  # (B, T, 1)
    uniform = torch.full_like(r, 1 / r.shape[-1])
    return torch.where(total > 0, r / total.clamp(min=1e-12), uniform)


def _forward(
    model: Captioner, tokens: torch.Tensor, cross: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The decoder (eval mode) with every attention map made explicit and a gradient leaf:
    hidden states (R, T, H) and per layer (self (R, nh, T, T), cross (R, nh, T, N))."""
    decoder = model.decoder
    T = tokens.shape[1]
    positions = torch.arange(T, device=tokens.device)
    x = decoder.emb_norm(decoder.tok_emb(tokens) + decoder.pos_emb(positions))  # (R, T, H)
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()  # (T, T)
    maps = []
    for layer, (k_img, v_img) in zip(decoder.layers, cross, strict=True):
        k, v = layer.self_attn.keys_values(x)  # (R, nh, T, hs)
        x, a_self = _attend(layer.self_attn, x, k, v, causal)
        x, a_cross = _attend(layer.cross_attn, x, k_img, v_img, None)
        x = layer.ffn_norm(x + layer.ffn_out(F.gelu(layer.ffn_in(x))))
        maps.append((a_self, a_cross))
    return x, maps


def _attend(
    attn: Attention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`Attention.forward` with the weights computed, used and returned as a gradient leaf."""
    R, T, C = x.shape
    q = attn.heads(attn.query(x))  # (R, nh, T, hs)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (R, nh, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(-1).detach().requires_grad_()  # (R, nh, T, S)
    y = (weights @ v).transpose(1, 2).reshape(R, T, C)  # (R, T, C)
    return attn.norm(x + attn.out(y)), weights


def _weighted(weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Chefer's Ā = E_h[(∇A ⊙ A)+]: (R, nh, T, S) -> (R, T, S)."""
    return (grad * weights).clamp(min=0).mean(1).detach()


def _without_residual(R_ss: torch.Tensor) -> torch.Tensor:
    """Rule 10's normalisation of self-attention relevance (R, T, T): the part beyond the
    identity (the residual path) scaled to rows summing to 1, then the identity added back."""
    eye = torch.eye(R_ss.shape[-1], device=R_ss.device)
    extra = R_ss - eye
    extra = torch.nan_to_num(extra / extra.sum(-1, keepdim=True), nan=0.0, posinf=0.0)
    return extra + eye
