import itertools
import random

import pytest
import torch

from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "pink", "brown", "grey", "golden"]
THINGS = ["cat", "dog", "car", "house", "tree", "bird", "boat", "chair", "lamp", "cup", "horse", "flower", "clock"]
PLACES = ["on a table", "in a field", "near the sea", "under a bridge", "in the snow", "at night", "in a city street"]


def captions(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        yield f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)}, painted by an artist"


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tokenizer(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "captions.model"
    assert train_tokenizer(captions(400), path, 400, model_type=request.param) == path
    return CaptionTokenizer(path)


def test_round_trip(tokenizer):
    texts = ["a red cat on a table", "a golden horse near the sea, painted by an artist"]
    encoded = tokenizer.encode(texts, 32)
    assert encoded.ids.dtype == torch.int64 and encoded.ids.shape == (2, 32)
    assert [tokenizer.decode(row) for row in encoded.ids] == texts


def test_padding_and_mask(tokenizer):
    encoded = tokenizer.encode(["a cat", "", "a blue bird in the snow"], 24)
    assert encoded.mask.dtype == torch.bool
    assert torch.equal(encoded.mask, encoded.ids != 0)  # pad is 0 and no real token is
    lengths = encoded.mask.sum(1)
    assert lengths[1] == 0 and 0 < lengths[0] < lengths[2] < 24
    for row, n in zip(encoded.mask, lengths):
        assert row[:n].all() and not row[n:].any()  # real tokens first, padding after
    assert encoded.truncated == 0


def test_truncation_is_counted(tokenizer):
    long = " ".join(itertools.islice(captions(10), 10))
    encoded = tokenizer.encode([long, "a cat", long], 8)
    assert encoded.truncated == 2
    assert encoded.mask[0].all() and encoded.mask[2].all() and not encoded.mask[1].all()
    assert long.startswith(tokenizer.decode(encoded.ids[0]))


def test_ids_in_range(tokenizer):
    encoded = tokenizer.encode(list(captions(50, seed=1)) + ["Ünïcödé wörds", "ZZZ 12345"], 40)
    assert 0 <= encoded.ids.min() and encoded.ids.max() < tokenizer.vocab_size
    assert 300 < tokenizer.vocab_size <= 400


def test_byte_fallback_spells_unseen_characters(tokenizer):
    text = "a cat 🐱 猫"
    ids = tokenizer.encode([text], 32).ids[0]
    assert 1 not in ids.tolist()  # no unk
    assert tokenizer.decode(ids) == text


def test_without_byte_fallback_unseen_characters_are_unk(tmp_path):
    path = train_tokenizer(captions(200), tmp_path / "m.model", 60, byte_fallback=False)
    tok = CaptionTokenizer(path)
    assert 1 in tok.encode(["a cat 🐱"], 16).ids[0].tolist()


def test_case_is_folded(tokenizer):
    assert torch.equal(tokenizer.encode(["A RED Cat"], 16).ids, tokenizer.encode(["a red cat"], 16).ids)


def test_max_captions_limits_what_is_read(tmp_path):
    pulled = 0

    def stream():
        nonlocal pulled
        for caption in captions(10_000):
            pulled += 1
            yield caption

    train_tokenizer(stream(), tmp_path / "m.model", 300, max_captions=50)
    assert pulled == 50


def test_small_corpus_gets_a_smaller_vocabulary(tmp_path, caplog):
    path = train_tokenizer(captions(100), tmp_path / "m.model", 5000)
    assert CaptionTokenizer(path).vocab_size < 5000
    assert "under the 5000 asked for" in caplog.text


def test_vocab_too_small_for_the_corpus_names_its_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"vocabulary of 12 on 30 captions"):
        train_tokenizer(captions(30), tmp_path / "m.model", 12, byte_fallback=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_training_errors(tmp_path):
    out = tmp_path / "m.model"
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer(iter([]), out, 300)
    with pytest.raises(ValueError, match="no captions"):
        train_tokenizer(["", "  "], out, 300)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(captions(10), out, 300, model_type="wordpiece")
    with pytest.raises(ValueError, match="at least 259"):
        train_tokenizer(captions(10), out, 100)
    with pytest.raises(ValueError, match="must be str"):
        train_tokenizer(["a cat", 5], out, 300)


def test_errors_from_the_caption_stream_propagate(tmp_path):
    def broken():
        yield "a cat"
        raise KeyError("shard missing")

    with pytest.raises(KeyError, match="shard missing"):
        train_tokenizer(broken(), tmp_path / "m.model", 300)


def test_loading_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        CaptionTokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        CaptionTokenizer(junk)


def test_pad_id_must_be_zero(tmp_path):
    import sentencepiece as spm

    path = tmp_path / "default.model"
    spm.SentencePieceTrainer.train(sentence_iterator=captions(200), model_prefix=str(tmp_path / "default"),
                                   vocab_size=60, minloglevel=2)
    with pytest.raises(ValueError, match="pad id must be 0"):
        CaptionTokenizer(path)


def test_encode_argument_errors(tokenizer):
    with pytest.raises(ValueError, match="single string"):
        tokenizer.encode("a cat", 8)
    with pytest.raises(ValueError, match="seq_len"):
        tokenizer.encode(["a cat"], 0)
    with pytest.raises(ValueError, match="1-D"):
        tokenizer.decode(torch.zeros(2, 3, dtype=torch.long))
