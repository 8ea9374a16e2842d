"""Tokenizer: bert-base-uncased ids, [CLS]/[SEP] framing, clean detokenisation."""

import hashlib

from model import decode_caption, encode_caption, normalize_caption
from model.tokenizer import packaged_vocab_dir


def test_packaged_vocab_is_bert_base_uncased():
    digest = hashlib.sha256((packaged_vocab_dir() / "vocab.txt").read_bytes()).hexdigest()
    assert digest == "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"


def test_caption_framing_and_special_ids(tokenizer):
    ids = encode_caption(tokenizer, "A red circle.", max_tokens=32)
    assert ids[0] == 101 and ids[-1] == 102  # [CLS] ... [SEP]
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]


def test_truncation_keeps_the_end_token(tokenizer):
    ids = encode_caption(tokenizer, "one two three four five six seven", max_tokens=5)
    assert len(ids) == 5 and ids[-1] == tokenizer.sep_token_id


def test_decoded_captions_are_clean_sentences(tokenizer):
    text = "A snowboarder's jump, over the half-pipe ; unbelievable !"
    ids = encode_caption(tokenizer, text, max_tokens=64)
    assert any(t.startswith("##") for t in tokenizer.convert_ids_to_tokens(ids))
    caption = decode_caption(tokenizer, ids)
    assert caption == "a snowboarder's jump, over the half-pipe; unbelievable!"
    assert "##" not in caption and "[" not in caption


def test_hyphenated_words_stay_joined(tokenizer):
    ids = encode_caption(tokenizer, "A man in a red t-shirt", max_tokens=32)
    assert decode_caption(tokenizer, ids) == "a man in a red t-shirt"


def test_normalize_caption():
    assert normalize_caption("  A dog  runs on the beach . ") == "a dog runs on the beach"
    assert normalize_caption("Two men , one ball .") == "two men, one ball"
