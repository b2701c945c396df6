"""--init-from's rules, on tiny models without DeepSpeed: strict shapes, the same dVAE, the text
vocabulary (an error, or rows mapped piece by piece). The end-to-end fine-tuning run is in
test_train_dalle.py."""

import shutil

import pytest
import torch

from conftest import tiny_clip, tiny_dalle, tiny_vae
from dalle_ds import CLIP, DALLE
from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer
from dalle_ds.training.init_from import check_init_from, init_from
from dalle_ds.training.train_clip import ClipTrainer
from dalle_ds.training.train_dalle import DalleTrainer

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    first = train_tokenizer([f"a {c} square" for c in COLOURS[:4]] * 20, root / "first.model", 300)
    second = train_tokenizer([f"a {c} circle" for c in COLOURS[2:]] * 20, root / "second.model", 300)
    return CaptionTokenizer(first), CaptionTokenizer(second), root


def export(model, folder, tokenizer_file):
    """An export's layout: the model and its captions' tokenizer."""
    model.save_pretrained(folder)
    shutil.copy(tokenizer_file, folder / "tokenizer.model")
    return folder


def test_a_model_starts_from_the_exported_weights(tmp_path, tokenizers):
    first, _, root = tokenizers
    vae = tiny_vae()
    trained = tiny_dalle(vae, num_text_tokens=first.vocab_size)
    folder = export(trained, tmp_path / "model", root / "first.model")
    fresh = tiny_dalle(vae, num_text_tokens=first.vocab_size)
    assert not torch.equal(fresh.text_emb.weight, trained.text_emb.weight)
    check_init_from(folder, DALLE, first, resize_text=False)
    init_from(fresh, folder, DALLE, first, DalleTrainer.text_weights)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))


def test_weights_that_do_not_fit_are_listed(tmp_path, tokenizers):
    first, _, root = tokenizers
    vae = tiny_vae()
    folder = export(tiny_dalle(vae, num_text_tokens=first.vocab_size), tmp_path / "model", root / "first.model")
    deeper = tiny_dalle(vae, num_text_tokens=first.vocab_size, depth=3)
    with pytest.raises(ValueError, match=r"do not fit the model this run's config builds \(missing: "
                                         r"transformer\.blocks\.2\.attn\.to_out\.bias"):
        init_from(deeper, folder, DALLE, first, DalleTrainer.text_weights)
    wider = tiny_dalle(vae, num_text_tokens=first.vocab_size, dim=48)
    with pytest.raises(ValueError, match=r"of another shape: image_col_emb\.weight, .* and \d+ more"):
        init_from(wider, folder, DALLE, first, DalleTrainer.text_weights)
    with pytest.raises(ValueError, match="holds a DALLE, not a CLIP"):
        check_init_from(folder, CLIP, first, resize_text=False)
    (folder / "tokenizer.model").unlink()  # a model saved from Python: its vocabulary is unknown
    with pytest.raises(ValueError, match="has no tokenizer.model, so its text vocabulary cannot be checked"):
        check_init_from(folder, DALLE, first, resize_text=True)


def test_dalle_keeps_the_dvae_it_was_trained_on(tmp_path, tokenizers):
    first, _, root = tokenizers
    folder = export(tiny_dalle(tiny_vae(), num_text_tokens=first.vocab_size), tmp_path / "model", root / "first.model")
    other_vae = tiny_vae()  # the same shapes, other weights
    with pytest.raises(ValueError, match="trained on the codes of another dVAE than --vae"):
        init_from(tiny_dalle(other_vae, num_text_tokens=first.vocab_size), folder, DALLE, first,
                  DalleTrainer.text_weights)


@pytest.mark.parametrize("kind", ["dalle", "clip"])
def test_another_text_vocabulary_is_an_error_or_mapped_by_piece(tmp_path, tokenizers, kind):
    first, second, root = tokenizers
    build = ((lambda n: tiny_dalle(vae, num_text_tokens=n)) if kind == "dalle" else
             (lambda n: tiny_clip(num_text_tokens=n)))
    cls, names = (DALLE, DalleTrainer.text_weights) if kind == "dalle" else (CLIP, ClipTrainer.text_weights)
    vae = tiny_vae()
    trained = build(first.vocab_size)
    folder = export(trained, tmp_path / "model", root / "first.model")
    with pytest.raises(ValueError, match=r"another text vocabulary \(\d+ pieces\) than --tokenizer .* "
                                         r"checkpoint\.resize_text_vocab=true"):
        check_init_from(folder, cls, second, resize_text=False)
    check_init_from(folder, cls, second, resize_text=True)
    fresh = build(second.vocab_size)
    before = {name: fresh.state_dict()[name].clone() for name in names}
    init_from(fresh, folder, cls, second, names)

    old_ids = {piece: i for i, piece in enumerate(first.pieces())}
    shared = [(i, old_ids[p]) for i, p in enumerate(second.pieces()) if p in old_ids]
    assert 0 < len(shared) < second.vocab_size  # some pieces shared ("blue", "yellow", pad ...), some new
    for name in names:
        got, old = fresh.state_dict()[name], trained.state_dict()[name]
        for new_id, old_id in shared:
            assert torch.equal(got[new_id], old[old_id]), (name, new_id)
        fresh_ids = [i for i in range(second.vocab_size) if second.pieces()[i] not in old_ids]
        assert torch.equal(got[fresh_ids], before[name][fresh_ids])
        assert torch.equal(got[second.vocab_size:], old[first.vocab_size:])  # DALLE's per-position pad rows
    untouched = [k for k in trained.state_dict() if k not in names]
    assert all(torch.equal(fresh.state_dict()[k], trained.state_dict()[k]) for k in untouched)


def test_a_dvae_starts_from_an_export(tmp_path):
    from dalle_ds import DiscreteVAE

    trained = tiny_vae()
    trained.save_pretrained(tmp_path / "vae")
    fresh = tiny_vae()
    check_init_from(tmp_path / "vae", DiscreteVAE, None, resize_text=False)
    init_from(fresh, tmp_path / "vae", DiscreteVAE)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), trained.state_dict().values()))
