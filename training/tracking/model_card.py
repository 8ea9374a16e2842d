"""The model card of an evaluated model: what it was trained on, how it scores, what it cannot do.

Written by `evaluate` to reports/model_card.md, set as the registered version's description
(MLflow renders it), logged with its run, and packed into the TorchServe archive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# What a model trained on each dataset cannot be trusted with.
LIMITS = {
    "synthetic": (
        "Trained only on generated pictures of one or two coloured circles, squares and "
        "triangles on a plain background. It describes every image in those words: a "
        "photograph of a dog gets a caption about shapes. Use it to check the pipeline and the "
        "serving path, not to caption real images."
    ),
    "flickr8k": (
        "Trained on Flickr8k's 6,000 training photographs (people, dogs and everyday outdoor "
        "scenes, English captions written by crowd workers in 2010-2013). Expect generic "
        "captions outside those scenes, and mistakes in counts, colours and who does what; "
        "the captions carry the annotators' biases (e.g. guessing gender). Do not use its "
        "captions to make decisions about people."
    ),
}
LIMITS_FOLDER = (
    "Trained on a user dataset: it knows only what those images and captions show. Read "
    "reports/predictions.jsonl before trusting it elsewhere."
)
LIMITS_ALWAYS = (
    "One caption per image, in English, at most {max_length} WordPieces; no confidence "
    "threshold: it always answers, also for images unlike anything it saw."
)

_METRICS = (
    ("bleu1", "BLEU-1"),
    ("bleu4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr"),
    ("content_accuracy", "content accuracy (colour, shape, relation)"),
)


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered by `evaluate`."""

    dataset: str  # tracking.dataset_name
    config: Mapping[str, Any]  # the checkpoint's CaptionerConfig as a dict
    parameters: int  # all of them, the frozen encoder included
    images: Mapping[str, int]  # images per split
    test_split: str  # registry.split_fingerprint
    metrics: Mapping[str, Any]  # metrics/eval.json
    decoding: Mapping[str, Any]
    preset: str = ""
    commit: str | None = None
    experiment: str | None = None
    extra: Mapping[str, str] = field(default_factory=dict)  # more provenance lines


def model_card(facts: CardFacts, name: str | None = None, version: str | None = None) -> str:
    """The card as Markdown; `name`/`version` when the model is registered."""
    config, decoding = facts.config, facts.decoding
    title = f"{name or 'imgtocap'} version {version}" if version else "imgtocap (not registered)"
    fusion = (
        "cross-attention over the image grid"
        if config.get("fusion") == "cross_attention"
        else "pooled image features concatenated with the decoder states"
    )
    splits = ", ".join(f"{n:,} {split}" for split, n in facts.images.items())
    lines = [
        f"# {title}",
        "",
        "Image captioning: a frozen ImageNet CNN encoder and a causal BERT decoder that writes a "
        "caption WordPiece by WordPiece.",
        "",
        "## Architecture",
        "",
        f"- preset `{facts.preset or '-'}`: encoder `{config.get('encoder')}` (frozen), decoder "
        f"`{config.get('decoder_weights') or 'random'}` with {config.get('num_layers')} layers of width "
        f"{config.get('hidden_size')}, fusion: {fusion}",
        f"- {facts.parameters / 1e6:.1f}M parameters; vocabulary: "
        + (
            f"{len(config['output_vocab'])} WordPieces seen in training"
            if config.get("output_vocab")
            else "all of BERT's WordPieces"
        ),
        "",
        "## Data",
        "",
        f"- dataset `{facts.dataset}`: {splits} images (split by image)",
        f"- test split id `{facts.test_split}` (the images' bytes and their reference "
        "captions): versions are compared only on the same id",
        "",
        f"## Test metrics (beam {decoding.get('num_beams')}, max length "
        f"{decoding.get('max_length')}, length penalty {decoding.get('length_penalty')}, "
        f"{decoding.get('cpu_decoder', 'fp32')} decoder weights on the CPU)",
        "",
        "| metric | value |",
        "|---|---:|",
        *(
            f"| {label} | {facts.metrics[key]:.4f} |"
            for key, label in _METRICS
            if key in facts.metrics
        ),
        "",
        "## Known limits",
        "",
        "- " + LIMITS.get(facts.dataset, LIMITS_FOLDER),
        "- " + LIMITS_ALWAYS.format(max_length=decoding.get("max_length")),
        "",
        "## Provenance",
        "",
        f"- git commit `{facts.commit or 'unknown'}`"
        + (f", DVC experiment `{facts.experiment}`" if facts.experiment else ""),
        *(f"- {key}: `{value}`" for key, value in facts.extra.items()),
    ]
    if name and version:
        lines += [
            "",
            "## Use",
            "",
            "```python",
            f'model = mlflow.pyfunc.load_model("models:/{name}/{version}")',
            'model.predict(pd.DataFrame({"image": [open("img.jpg", "rb").read()]}))',
            "```",
            "",
            f"`dvc repro` packs it as model-store/imgtocap.mar, stamped version {version}: "
            "TorchServe's describe call and every caption response name it.",
        ]
    return "\n".join(lines) + "\n"


def retitle(card: str, name: str | None, version: str) -> str:
    """The card `evaluate` wrote (not registered yet) with the registered name and version."""
    first, _, rest = card.partition("\n")
    return f"# {name or 'imgtocap'} version {version}\n{rest}" if first.startswith("# ") else card
