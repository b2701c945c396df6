"""Fine-tuning: a new run whose model starts from a trained one's weights (``--init-from``, an
export or a run folder), with a fresh optimizer, schedule and data position.

Strict: a weight that does not fit the run's model is an error that lists them. A DALL-E must
keep its dVAE (its image embeddings mean that dVAE's codes). A text vocabulary other than the
init model's is an error, unless ``checkpoint.resize_text_vocab``: then each piece both
tokenizers share keeps its trained rows and the others start fresh.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.tokenizer import CaptionTokenizer
from ..models.pretrained import load_strict, model_fingerprint
from .export import TOKENIZER, load_trained, trained_record


def check_init_from(path, kind: type, tokenizer: CaptionTokenizer | None, resize_text: bool) -> None:
    """Before any heavy start-up: ``path`` holds a ``kind`` and, for a captioned model, the
    tokenizer it was trained with, which is the run's (or resize_text is set)."""
    trained_record(path, kind)
    if tokenizer is None:
        return
    init_tokenizer = Path(path) / TOKENIZER
    if not init_tokenizer.is_file():
        raise ValueError(f"--init-from {path} has no {TOKENIZER}, so its text vocabulary cannot be checked: copy "
                         f"the sentencepiece model it was trained with there (dalle-ds export does)")
    init, run = CaptionTokenizer(init_tokenizer).pieces(), tokenizer.pieces()
    if init != run and not resize_text:
        raise ValueError(f"--init-from {path} was trained with another text vocabulary ({len(init)} pieces) than "
                         f"--tokenizer ({len(run)} pieces): give --tokenizer its {TOKENIZER}, or set "
                         f"checkpoint.resize_text_vocab=true to keep the rows of the pieces both share and start "
                         f"the others fresh")


def init_from(model: torch.nn.Module, path, kind: type, tokenizer: CaptionTokenizer | None = None,
              text_weights: tuple[str, ...] = ()) -> None:
    """Loads the weights of the ``kind`` model in ``path`` into ``model``, once
    ``check_init_from`` passed. ``text_weights`` name the weights with one row per text token
    (any rows after the vocabulary keep their order); with the run's ``tokenizer`` they are
    mapped piece by piece from the init model's own."""
    init, init_tokenizer = load_trained(path, kind)
    state = init.state_dict()
    if hasattr(model, "vae"):
        _check_same_vae(init, model, path)  # then the init's vae.* weights are the run's own
    if tokenizer is not None:
        state = _text_rows_by_piece(state, model.state_dict(), text_weights,
                                    CaptionTokenizer(init_tokenizer).pieces(), tokenizer.pieces())
    load_strict(model, state, f"--init-from {path}", into="the model this run's config builds")


def _check_same_vae(init: torch.nn.Module, model: torch.nn.Module, path) -> None:
    if model_fingerprint(init.vae) != model_fingerprint(model.vae):
        raise ValueError(f"--init-from {path} was trained on the codes of another dVAE than --vae: its image "
                         f"embeddings mean that dVAE's codes; give --vae the one it was trained with (its run "
                         f"folder's vae/), and token shards made with it")


def _text_rows_by_piece(state: dict, fresh: dict, names: tuple[str, ...], init_pieces: list[str],
                        run_pieces: list[str]) -> dict:
    if init_pieces == run_pieces:
        return state
    index = {piece: i for i, piece in enumerate(init_pieces)}
    # never empty: train-tokenizer's models all hold the pad and unk pieces
    shared = [(new, index[piece]) for new, piece in enumerate(run_pieces) if piece in index]
    to_rows, from_rows = (list(rows) for rows in zip(*shared))
    state = dict(state)
    for name in names:
        old, new = state[name], fresh[name].clone()
        if old.shape[0] - len(init_pieces) != new.shape[0] - len(run_pieces) or old.shape[1:] != new.shape[1:]:
            continue  # not the same layout around the vocabulary: load_strict names it
        new[to_rows] = old[from_rows]
        new[len(run_pieces):] = old[len(init_pieces):]  # rows after the vocabulary (DALLE's per-position pads)
        state[name] = new
    return state
