"""The raw image-text stream (train-vae, train-clip): counts, decoding, rejects, exact resume."""

import json
import tarfile

import numpy as np
import pytest
import torch

from dalle_ds.data.sources import raw_shard_samples
from dalle_ds.data import stream as stream_module
from dalle_ds.data.stream import ImageTextStream, StreamConfig
from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer
from data_fixtures import COLOURS, good_sample, png_bytes, write_shard

SIZES = [6, 4, 7, 5]


def sample(i: int) -> dict:
    """A distinct image per sample: its index is drawn in the top-left pixels. Even samples have
    several captions, one per line."""
    s = good_sample(i)
    s.pop("jpg", None)
    s["png"] = png_bytes((i % 256, (i * 7) % 256, 0))
    s["txt"] = "\n".join(captions(i)).encode()
    return s


def captions(i: int) -> list[str]:
    names = list(COLOURS)
    return [f"a {names[(i + k) % len(names)]} square" for k in range(len(names) if i % 2 == 0 else 1)]


def index_of(image: torch.Tensor) -> int:
    return int(image[0, 8, 8])


def write_raw(folder, bad_every: int = 0, text_only_every: int = 0):
    """Shards of SIZES good samples; every ``bad_every``-th followed by one with an undecodable
    image, every ``text_only_every``-th by one without an image."""
    folder.mkdir()
    i = 0
    for s, size in enumerate(SIZES):
        samples = []
        for _ in range(size):
            samples.append(sample(i))
            if bad_every and i % bad_every == 0:
                samples.append({"key": f"bad{i}", "png": b"not an image", "txt": b"broken"})
            if text_only_every and i % text_only_every == 0:
                samples.append({"key": f"textonly{i}", "txt": b"a caption without its image"})
            i += 1
        write_shard(folder / f"{s:05d}.tar", samples)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    captions = [f"a {c} square" for c in COLOURS] * 20
    return train_tokenizer(captions, tmp_path_factory.mktemp("tok") / "tok.model", 300)


def indices(batches) -> list[int]:
    return [index_of(img) for b in batches for img in b["images"]]


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_counts_come_from_img2dataset_stats_or_the_headers(tmp_path):
    folder = write_raw(tmp_path / "raw", bad_every=3)
    shard = str(folder / "00000.tar")
    assert raw_shard_samples(shard) == SIZES[0] + 2  # every keyed image counts, good or not
    (folder / "00000_stats.json").write_text(json.dumps({"successes": 5, "failed_to_download": 1}))
    assert raw_shard_samples(shard) == 5


def test_batches_hold_decoded_images_and_tokenized_captions(tmp_path, tokenizer):
    folder = write_raw(tmp_path / "raw")
    stream = ImageTextStream(folder, 16, StreamConfig(batch_size=4, shuffle_buffer=0, num_workers=0),
                             tokenizer_path=tokenizer, text_seq_len=8)
    batch = take(stream, 1)[0]
    assert batch["images"].shape == (4, 3, 16, 16) and batch["images"].dtype == torch.uint8
    captions = CaptionTokenizer(tokenizer).decode(batch["text"][0])
    assert captions in {f"a {c} square" for c in COLOURS} and batch["mask"].dtype == torch.bool
    no_text = take(ImageTextStream(folder, 16, StreamConfig(batch_size=4, num_workers=0)), 1)[0]
    assert set(no_text) == {"images"}


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_sees_each_good_image_once_and_rejects_are_counted(tmp_path, workers):
    folder = write_raw(tmp_path / "raw", bad_every=4)
    config = StreamConfig(batch_size=2, shuffle_buffer=3, num_workers=workers)
    stream = ImageTextStream(folder, 16, config)
    # the header counts include the bad images: workers refill from a second pass, never run dry
    length = stream.batches_per_epoch()
    seen = indices(take(stream, length))
    good = sum(SIZES)
    assert len(seen) == 2 * length and len(set(seen)) >= good - 2 * max(workers, 1)
    assert stream.rejects.counts["corrupt_image"] >= sum(SIZES) // 4 - 1


@pytest.mark.parametrize("workers,stop_at", [(0, 3), (2, 5), (2, 8), (2, 11)])
def test_resume_gives_the_same_images_and_captions(tmp_path, tokenizer, workers, stop_at):
    folder = write_raw(tmp_path / "raw", bad_every=5)
    config = StreamConfig(batch_size=2, shuffle_buffer=4, num_workers=workers, seed=3)

    def make():
        return ImageTextStream(folder, 16, config, tokenizer_path=tokenizer, text_seq_len=8)

    straight = take(make(), 14)  # two epochs and more
    first = make()
    before = take(first, stop_at)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for expected, got in zip(straight, before + take(resumed, 14 - stop_at), strict=True):
        assert all(torch.equal(expected[k], got[k]) for k in ("images", "text", "mask"))


def test_clip_trains_each_epoch_on_one_caption_drawn_from_seed_epoch_and_key(tmp_path, tokenizer):
    folder = write_raw(tmp_path / "raw")
    decode = CaptionTokenizer(tokenizer).decode

    def drawn(seed, epochs=4):  # per epoch: sample index -> the caption it was trained on
        config = StreamConfig(batch_size=2, shuffle_buffer=3, num_workers=2, seed=seed)
        stream = ImageTextStream(folder, 16, config, tokenizer_path=tokenizer, text_seq_len=8)
        n = stream.batches_per_epoch()
        batches = take(stream, n * epochs)
        return [{index_of(img): decode(t) for b in batches[e * n:(e + 1) * n] for img, t in zip(b["images"], b["text"])}
                for e in range(epochs)]

    epochs = drawn(seed=0)
    assert epochs == drawn(seed=0)
    assert all(c in captions(i) for epoch in epochs for i, c in epoch.items())
    several = set.intersection(*(set(e) for e in epochs)) & set(range(0, sum(SIZES), 2))
    assert len(several) > 5 and sum(len({e[i] for e in epochs}) > 1 for i in several) > len(several) / 2
    other = drawn(seed=1, epochs=1)[0]
    assert any(other[i] != epochs[0][i] for i in set(other) & several), "the draw follows the seed"


def test_data_that_never_decodes_stops_with_the_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(stream_module, "MAX_REJECTS_IN_ROW", 50)  # the same check, on a smaller shard
    folder = tmp_path / "raw"
    folder.mkdir()
    bad = [{"key": f"{i:05d}", "png": b"junk", "txt": b"x"} for i in range(20)]  # passes repeat them
    write_shard(folder / "00000.tar", bad)
    stream = ImageTextStream(folder, 16, StreamConfig(batch_size=2, shuffle_buffer=0, num_workers=0))
    with pytest.raises(ValueError, match="samples in a row were rejected .*corrupt_image"):
        take(stream, 1)


def test_remote_shards_need_resampled_mode(tmp_path):
    with pytest.raises(ValueError, match="data.resampled=true and data.epoch_samples"):
        ImageTextStream("pipe:cat /nowhere/{0..3}.tar", 16)


def test_pixels_match_the_source_image(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    write_shard(folder / "00000.tar", [good_sample(i, "blue") for i in range(4)])
    batch = take(ImageTextStream(folder, 16, StreamConfig(batch_size=4, num_workers=0)), 1)[0]
    mean = batch["images"].float().mean(dim=(0, 2, 3)).numpy()
    assert np.abs(mean - np.array(COLOURS["blue"])).max() < 8


@pytest.mark.parametrize("workers,stop_at", [(0, 4), (2, 3), (2, 6)])
def test_a_shard_cut_short_keeps_its_last_whole_sample_and_resumes_exactly(tmp_path, workers, stop_at):
    folder = write_raw(tmp_path / "raw")
    shard = folder / "00002.tar"  # samples 10..16, members png, txt, json each
    with tarfile.open(shard) as tar:
        header = tar.getmembers()[12].offset  # the header of sample 14, after whole sample 13
    shard.write_bytes(shard.read_bytes()[:header + 200])
    config = StreamConfig(batch_size=2, shuffle_buffer=4, num_workers=workers, seed=5)
    stream = ImageTextStream(folder, 16, config)
    epoch = indices(take(stream, stream.batches_per_epoch()))
    assert 13 in epoch and not {14, 15, 16} & set(epoch)
    assert stream.rejects.counts["truncated_shard"] >= 1 and "incomplete_sample" not in stream.rejects.counts

    straight = indices(take(ImageTextStream(folder, 16, config), 12))
    first = ImageTextStream(folder, 16, config)
    before = indices(take(first, stop_at))
    resumed = ImageTextStream(folder, 16, config)
    resumed.load_state_dict(first.state_dict())
    assert before + indices(take(resumed, 12 - stop_at)) == straight


def test_an_elastic_resume_over_raw_shards_with_rejects_reads_no_sample_twice(tmp_path):
    """Samples without an image amid good ones are not in the shards' counts: the rest of the
    epoch on another layout still follows the counts. (Undecodable images are counted; a worker
    short of good samples re-reads some to fill its batches, elastic or not.)"""
    folder = write_raw(tmp_path / "raw", text_only_every=3)

    def stream(world, rank, workers):
        config = StreamConfig(batch_size=2, shuffle_buffer=4, num_workers=workers, seed=3)
        return ImageTextStream(str(folder), 16, config, rank=rank, world_size=world)

    old = [stream(2, r, 1) for r in range(2)]
    seen = [index_of(img) for s in old for b in take(s, 3) for img in b["images"]]
    states = [s.state_dict() for s in old]
    new = stream(1, 0, 2)
    new.load_state_dicts(states)
    rest = [index_of(img) for b in take(new, new.batches_per_epoch()) for img in b["images"]]
    assert rest and len(seen + rest) == len(set(seen + rest))
    assert new.rejects.counts["missing_image"] > 0
