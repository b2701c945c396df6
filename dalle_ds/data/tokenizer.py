"""The caption tokenizer: a sentencepiece model trained on the captions themselves.

Ids lie in [0, vocab_size) with pad = 0 (the contract DALLE and CLIP rely on) and unk = 1; there
is no bos or eos, since DALLE adds its own bos. Build the models with
``DALLE(num_text_tokens=tokenizer.vocab_size, ...)``.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sentencepiece as spm
import torch

from ..files import atomic_write_bytes

log = logging.getLogger(__name__)

MODEL_TYPES = ("bpe", "unigram")
PAD_ID, UNK_ID = 0, 1
_BYTE_PIECES = 256  # byte_fallback adds one piece per byte value

# Sentencepiece's trainer options that do not depend on the call. nmt_nfkc_cf is NFKC plus case
# folding: captions' case rarely changes the picture, and folding it spends the vocabulary on
# more words (CLIP's and DALL-E's BPE lowercase too). minloglevel=2: only errors, since a large
# corpus otherwise logs a line per skipped over-long caption.
_TRAINER_OPTIONS = {
    "pad_id": PAD_ID,
    "unk_id": UNK_ID,
    "bos_id": -1,
    "eos_id": -1,
    "normalization_rule_name": "nmt_nfkc_cf",
    "hard_vocab_limit": False,  # vocab_size is an upper bound: a small corpus gets a smaller vocabulary
    "minloglevel": 2,
}


def train_tokenizer(
    captions: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    max_captions: int | None = None,
    seed: int = 0,
) -> Path:
    """Train a sentencepiece model on at most ``max_captions`` captions, streamed (blank ones are
    skipped but count towards the limit), and write it atomically to ``out_path``.

    byte_fallback spells characters unseen in training as byte pieces instead of unk, at the
    cost of 256 ids. The trained vocabulary may be smaller than ``vocab_size`` when the corpus
    has fewer distinct pieces; read CaptionTokenizer.vocab_size, not the request.
    """
    minimum = _minimum_vocab_size(byte_fallback)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} with byte_fallback={byte_fallback}, got {vocab_size}")
    if max_captions is not None and max_captions < 1:
        raise ValueError(f"max_captions must be >= 1 or None, got {max_captions}")
    stream = _CaptionStream(captions, max_captions)
    spm.set_random_generator_seed(seed)
    proto = _train(stream, vocab_size, model_type, byte_fallback)
    out_path = Path(out_path)
    atomic_write_bytes(out_path, proto)
    trained = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
    if trained < vocab_size:
        log.warning("%d captions gave a vocabulary of %d, under the %d asked for", stream.count, trained, vocab_size)
    return out_path


@dataclass
class EncodedCaptions:
    ids: torch.Tensor  # (b, seq_len) int64, 0-padded at the end
    mask: torch.Tensor  # (b, seq_len) bool, True on real tokens
    truncated: int  # how many captions were longer than seq_len and lost their end


class CaptionTokenizer:
    """A trained sentencepiece model. Ids lie in [0, vocab_size), 0 is padding."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise ValueError(f"tokenizer model {path} does not exist; train one with dalle-ds train-tokenizer")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{path} is not a sentencepiece model: {e}") from None
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"{path}: pad id must be {PAD_ID}, got {self._sp.pad_id()}; retrain with dalle-ds train-tokenizer"
            )

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def pieces(self) -> list[str]:
        """The vocabulary, by id."""
        return [self._sp.id_to_piece(i) for i in range(self.vocab_size)]

    def encode(self, captions: Sequence[str], seq_len: int) -> EncodedCaptions:
        """Encode a batch (one sentencepiece call, multithreaded), cut to seq_len, pad with 0."""
        if isinstance(captions, str):
            raise ValueError("encode takes a sequence of captions, got a single string; wrap it in a list")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        rows = self._sp.encode(list(captions), out_type=int)
        ids = np.zeros((len(rows), seq_len), dtype=np.int64)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for i, row in enumerate(rows):
            lengths[i] = min(len(row), seq_len)
            ids[i, : lengths[i]] = row[:seq_len]
        mask = np.arange(seq_len) < lengths[:, None]
        truncated = sum(len(row) > seq_len for row in rows)
        return EncodedCaptions(torch.from_numpy(ids), torch.from_numpy(mask), truncated)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """One caption's ids (1-D) -> text, pads dropped wherever they are."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1:
                raise ValueError(f"decode takes one caption's ids (1-D), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self._sp.decode([i for i in ids if i != PAD_ID])


class _CaptionStream:
    """The captions as sentencepiece pulls them: limited, blank ones skipped, counted. It keeps
    the first error the caller's iterable raises, since sentencepiece reports it as an opaque
    RuntimeError."""

    def __init__(self, captions: Iterable[str], limit: int | None):
        self._captions = itertools.islice(captions, limit)
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for caption in self._captions:
                if not isinstance(caption, str):
                    raise ValueError(f"captions must be str, got {type(caption).__name__} at caption {self.count}")
                if caption.strip():
                    self.count += 1
                    yield caption
        except Exception as e:
            self.error = e
            raise


def _minimum_vocab_size(byte_fallback: bool) -> int:
    # pad, unk, the byte pieces and at least one piece of text; the corpus' distinct characters
    # usually need more, which sentencepiece reports (see _train).
    return 2 + (_BYTE_PIECES if byte_fallback else 0) + 1


def _train(stream: _CaptionStream, vocab_size: int, model_type: str, byte_fallback: bool) -> bytes:
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(stream),
            model_writer=writer,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=byte_fallback,
            num_threads=os.cpu_count() or 1,
            **_TRAINER_OPTIONS,
        )
    except RuntimeError as e:
        if stream.error is not None:
            raise stream.error from None
        if stream.count == 0:
            raise ValueError("no captions to train the tokenizer on (the stream is empty or blank)") from None
        raise ValueError(
            f"sentencepiece could not train a vocabulary of {vocab_size} on {stream.count} captions "
            f"(model_type={model_type}, byte_fallback={byte_fallback}): {e}"
        ) from None
    return writer.getvalue()
