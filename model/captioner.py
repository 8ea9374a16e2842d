"""Captioner: frozen CNN encoder + causal BERT decoder + fusion; training loss and decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .config import CaptionerConfig
from .decoder import KV, Decoder
from .decoding import Generation, beam_search, greedy
from .encoders import ImageEncoder, preprocess
from .fusion import FUSIONS, Fusion
from .options import Decoding
from .relevance import relevance


class Captioner(nn.Module):
    """Image -> caption tokens. `forward` gives (logits, loss); `generate` decodes."""

    fusion: Fusion  # how the image reaches the words (model.fusion); its layers are ours too

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        self.config = config
        self.encoder = ImageEncoder(config.encoder)
        fusion = FUSIONS[config.fusion]  # its class: the decoder is built first, as it always was
        self.decoder = Decoder(config, cross_attention=fusion.cross_attention)
        self._adopt(fusion(config, self.encoder.spec))
        if config.output_vocab is not None:
            ids = torch.tensor(config.output_vocab)
            index = torch.full((config.vocab_size,), -100)  # vocab id -> output index
            index[ids] = torch.arange(len(ids))
            self.register_buffer("output_ids", ids)  # (V',)
            self.register_buffer("output_index", index)  # (V,)
        for name, module in self.named_children():
            if name != "encoder":
                module.apply(_init_bert)

    def _adopt(self, fusion: Fusion) -> None:
        """Hold `fusion` with its layers and parameters registered on the Captioner itself, under
        their own names: the state-dict keys (`image_proj.weight`, `row_emb`, `head.bias`, ...),
        the parameter order (optimizer states, gradient clipping) and the initialisation order
        stay those of every checkpoint saved before fusion was a module of its own."""
        if self._parameters:
            raise RuntimeError("a Captioner adopts its fusion before any parameter of its own")
        object.__setattr__(self, "fusion", fusion)  # not a child: no `fusion.` key prefix
        # one dict of direct parameters (row_emb, col_emb): a load with assign=True (io.py) or a
        # conversion that replaces parameters reaches the fusion too
        object.__setattr__(self, "_parameters", fusion._parameters)
        for name, module in fusion.named_children():
            self.add_module(name, module)  # the same module objects

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        self.fusion.training = mode  # not a child, so nn.Module.train does not reach it
        return self

    # --- image side -----------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> this model's encoder input (3, S, S)."""
        return preprocess(image, self.config.encoder)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> frozen grid features (B, N, C)."""
        return self.encoder(pixels.to(self.image_proj.weight))

    def image_context(self, grid: torch.Tensor) -> torch.Tensor:
        """Grid features (B, N, C) -> what the decoder reads: memory (B, N, H) or pooled (B, H)."""
        return self.fusion.context(self.balanced(grid.to(self.image_proj.weight)))

    def balanced(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, N, C): the middle stage's channels normalised per cell, times `mid_scale`."""
        last = self.encoder.spec.last_channels
        mid = grid[..., last:]  # (B, N, C2)
        mid = F.layer_norm(mid, mid.shape[-1:]) * self.config.mid_scale
        return torch.cat([grid[..., :last], mid], dim=-1)  # (B, N, C1 + C2)

    # --- text side ------------------------------------------------------------------------

    def _output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer over the output vocabulary: weight (V', D), bias (V',)."""
        weight, bias = self.fusion.output_layer(self.decoder.tok_emb.weight)
        if self.config.output_vocab is not None:
            weight, bias = weight[self.output_ids], bias[self.output_ids]  # (V', *)
        return weight, bias

    def _logits(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Decoder states (B, T, H) -> logits over the output vocabulary (B, T, V')."""
        return F.linear(self.fusion.head_input(hidden, context), *self._output_layer())

    def _cross_keys_values(self, context: torch.Tensor) -> list[KV] | None:
        """Every layer's cross-attention keys/values of the context; None: no cross-attention."""
        return self.fusion.cross_keys_values(context, self.decoder)

    def forward(
        self,
        grid: torch.Tensor,
        tokens: torch.Tensor,
        label_smoothing: float = 0.0,
        rows: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. grid (I, N, C), tokens (B, T) = [CLS] ... [SEP] [PAD]...

        `rows` (B,) says which image each caption describes (default: caption i, image i):
        several captions of one image share its projected memory, computed once.
        Returns logits (B, T-1, V') predicting tokens[:, 1:] (V' = the output vocabulary) and
        the mean loss over non-pad targets (`reduction="sum"`: their sum, 0 for no captions).
        """
        context = self.image_context(grid)  # (I, N, H) or (I, H)
        cross = self._cross_keys_values(context)
        if rows is not None:
            context = context[rows]
            cross = [(k[rows], v[rows]) for k, v in cross] if cross else None  # (B, nh, N, hs)
        hidden, _, _ = self.decoder(tokens[:, :-1], cross=cross)  # (B, T-1, H)
        logits = self._logits(hidden, context)
        targets = tokens[:, 1:]  # shifted: position t predicts token t+1
        if self.config.output_vocab is not None:
            # -100 (ignored) for a token the model cannot emit: only padding, in practice
            targets = self.output_index[targets]
        targets = targets.masked_fill(tokens[:, 1:] == self.config.pad_id, -100)
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            targets.flatten(),
            ignore_index=-100,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )
        return logits, loss

    @torch.no_grad()
    def attention(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing's raw cross-attention over the image (`attention_map`): grid (B, N, C),
        tokens (B, T) = [CLS] ... -> (B, T-1, N), row t the step that predicts tokens[:, t+1].
        What `generate(return_attention=True)` returns is `relevance` instead, which points at
        the word's own object more often (bench/attention.py compares them)."""
        self.require_attention()
        cross = self._cross_keys_values(self.image_context(grid))
        _, _, weights = self.decoder(tokens[:, :-1], cross=cross, need_weights=True)
        return attention_map(weights)

    def require_attention(self) -> None:
        """Raise ValueError, saying what to do, if this model has no attention over the grid."""
        if not self.fusion.cross_attention:
            raise ValueError(
                f"this model's fusion is {self.config.fusion!r}: it reads one pooled image "
                "vector, so there is no attention over the image grid to return; ask without "
                "attention, or train with model.fusion: cross_attention"
            )

    # --- decoding -------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor | None = None,
        *,
        grid: torch.Tensor | None = None,
        num_beams: int = Decoding.num_beams,
        max_length: int = Decoding.max_length,
        length_penalty: float = Decoding.length_penalty,
        no_repeat_ngram_size: int = Decoding.no_repeat_ngram_size,
        use_cache: bool = True,
        return_attention: bool = False,
    ) -> Generation:
        """Caption a batch: pixels (B, 3, S, S) or precomputed grid features (B, N, C).

        The image is encoded once; with `use_cache` each step feeds only the newest token.
        `max_length` counts generated tokens including [SEP]; scores are summed log-probs
        divided by length ** length_penalty; `no_repeat_ngram_size` n > 0 lets no n-gram occur
        twice in a caption (0: off); the defaults are `Decoding`'s (model/options.py).
        `return_attention` adds `Generation.attention`: per image (T, N), what each of its T
        tokens drew on in the image (`relevance.relevance` on the chosen tokens: one forward and
        backward pass after the search); the tokens and scores are the same bits either way. A
        `concat` model has no attention over the grid: asking it raises ValueError.
        """
        if (pixels is None) == (grid is None):
            raise ValueError("pass exactly one of pixels= or grid=")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        if not 1 <= max_length < self.config.max_position:
            raise ValueError(
                f"max_length must be in [1, {self.config.max_position - 1}], got {max_length}"
            )
        if return_attention:
            self.require_attention()
        if grid is None:
            grid = self.encode_image(pixels)
        state = CaptionerState(self, self.image_context(grid), use_cache)
        if num_beams == 1:
            out = greedy(
                state, self.config, max_length, length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
            )  # fmt: skip
        else:
            out = beam_search(
                state, self.config, num_beams, max_length, length_penalty,
                no_repeat_ngram_size=no_repeat_ngram_size,
            )  # fmt: skip
        if return_attention:
            out.attention = self._relevance(grid, out.tokens)
        return out

    def _relevance(self, grid: torch.Tensor, captions: list[list[int]]) -> list[torch.Tensor]:
        """Per caption (T, N) float32 on the CPU: `relevance` of each of its tokens, the batch
        at once (padding after a caption leaves its rows alone: the decoder is causal)."""
        longest = max(len(ids) for ids in captions)
        tokens = torch.full((len(captions), longest + 1), self.config.pad_id, device=grid.device)
        tokens[:, 0] = self.config.bos_id
        for i, ids in enumerate(captions):
            tokens[i, 1 : len(ids) + 1] = torch.tensor(ids)
        if longest == 0:
            maps = grid.new_zeros(len(captions), 0, grid.shape[1])  # (B, 0, N): nothing said
        else:
            maps = relevance(self, grid, tokens)  # (B, longest, N)
        return [m[: len(ids)].float().cpu() for m, ids in zip(maps, captions, strict=True)]


class CaptionerState:
    """A batch being decoded by a Captioner (a `decoding.DecodeState`): the self-attention KV
    cache, the image context and its cross-attention keys/values, the output layer.

    The image side and the output layer are computed once per batch, not per step. Everything
    held per row is reordered in `select`, the one place beams change rows.
    """

    def __init__(
        self,
        model: Captioner,
        context: torch.Tensor,
        use_cache: bool = True,
    ):
        self.model = model
        self.use_cache = use_cache  # False: every step recomputes the whole prefix
        self.batch_size, self.device = context.shape[0], context.device
        self.context = context  # (B, N, H) memory or (B, H) pooled
        self.cross = model._cross_keys_values(context)  # per layer (B, nh, N, hs); None: concat
        self.weight, self.bias = model._output_layer()  # (V', D), (V',)
        self.past: list[KV] | None = None  # per layer (B, nh, T, hs)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prefixes (B, T) -> next-token log-probs over the output vocabulary (B, V').

        The output layer is computed as (V', D) @ (D, B): for a few rows CPU BLAS runs this
        2-5x faster than x @ W.T (nn.Linear's layout), and it is most of a step's work.
        """
        new = tokens[:, -1:] if self.past is not None else tokens  # the cache holds the rest
        hidden, past, _ = self.model.decoder(new, cross=self.cross, past=self.past)  # (B, T', H)
        if self.use_cache:
            self.past = past
        x = self.model.fusion.head_input(hidden[:, -1:], self.context)[:, 0]  # (B, D)
        logits = torch.addmm(self.bias[:, None], self.weight, x.T).T  # (B, V')
        return F.log_softmax(logits.float(), dim=-1)

    def select(self, rows: torch.Tensor, image: bool = False) -> None:
        """Row i continues row rows[i] (B',); with `image`, the image context is gathered too."""
        if self.past is not None:
            self.past = [(k[rows], v[rows]) for k, v in self.past]  # (B', nh, T, hs)
        if image:
            self.context = self.context[rows]
            if self.cross is not None:
                self.cross = [(k[rows], v[rows]) for k, v in self.cross]  # (B', nh, N, hs)


def attention_map(weights: list[torch.Tensor]) -> torch.Tensor:
    """Every layer's cross-attention (B, nh, T, N) -> (B, T, N): the mean over all layers and
    all their heads, a distribution over the N grid cells. The baseline that bench/attention.py
    scores `relevance` against (docs/results.md, "Attention")."""
    return torch.stack(weights).mean(dim=(0, 2))  # (L, B, nh, T, N) -> (B, T, N)


def _init_bert(module: nn.Module) -> None:
    """BERT's initialisation for freshly created layers."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
