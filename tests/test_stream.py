"""The token-shard training stream: coverage, rank splits, exact resume, rejects, errors."""

import numpy as np
import pytest
import torch

from dalle_ds.data.manifest import ShardRecord, merge_manifest, write_shard_record
from dalle_ds.data.stream import StreamConfig, TokenStream
from dalle_ds.data.token_shards import TokenSample, TokenShardWriter, codes_dtype
from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer

SHARD_SIZES = [7, 5, 9, 6, 8, 4, 6, 5]
GRID, TEXT_LEN = 4, 8
HEADER = dict(vae_fingerprint="f" * 64, image_size=16, grid_size=GRID, num_codes=300, codes_dtype=codes_dtype(300).str)
WORDS = ["red", "green", "blue", "small", "large", "circle", "square", "left", "right", "top"]


def caption(i: int) -> str:
    return " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(1 + i % 12))  # some exceed TEXT_LEN


def captions(i: int) -> list[str]:
    """Every third sample has three captions, as COCO's images have several."""
    return [caption(i + k) for k in range(3 if i % 3 == 0 else 1)]


def write_token_folder(folder, bad: bool = False, first_index: int = 0, captions=captions):
    folder.mkdir()
    dtype, index = codes_dtype(300), first_index
    for s, size in enumerate(SHARD_SIZES):
        writer = TokenShardWriter(folder / f"{s:05d}.tar", dtype)
        for j in range(size):
            codes = np.full(GRID * GRID, 7)
            codes[0], codes[1] = index % 256, index // 256  # the sample's identity
            writer.write(TokenSample(f"{index:06d}", codes, "\n".join(captions(index)), {}))
            if bad and j == 1:  # a sample with an empty caption, amid good ones
                writer.write(TokenSample(f"{index:06d}b", codes, "", {}))
            index += 1
        writer.commit()
        name = f"{s:05d}.tar"  # the record counts the good samples
        write_shard_record(folder, ShardRecord(name, "src", size, bytes=(folder / name).stat().st_size))
    merge_manifest(folder, HEADER)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_token_folder(root / "tokens")
    model = train_tokenizer((caption(i) for i in range(200)), root / "tok.model", 300)
    return root / "tokens", model


def ids(batch) -> list[int]:
    return (batch["codes"][:, 0] + 256 * batch["codes"][:, 1]).tolist()


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_covers_every_full_batch_once(data, workers):
    folder, model = data
    stream = TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=4, shuffle_buffer=10, num_workers=workers))
    length = stream.batches_per_epoch()
    # each worker drops its last partial batch: less than one batch lost per worker
    assert sum(SHARD_SIZES) // 4 - max(workers, 1) < length <= sum(SHARD_SIZES) // 4
    seen = [i for batch in take(stream, length) for i in ids(batch)]
    assert len(seen) == len(set(seen)) == 4 * length
    batch = take(stream, 1)[0]
    assert batch["text"].shape == (4, TEXT_LEN) and batch["mask"].dtype == torch.bool
    assert batch["codes"].shape == (4, GRID * GRID) and batch["codes"].dtype == torch.long


def test_epochs_reshuffle_deterministically(data):
    folder, model = data
    config = StreamConfig(batch_size=4, shuffle_buffer=10, num_workers=0, seed=3)
    first = TokenStream(folder, model, TEXT_LEN, config)
    n = first.batches_per_epoch()
    a = [ids(b) for b in take(first, 2 * n)]
    b = [ids(b) for b in take(TokenStream(folder, model, TEXT_LEN, config), 2 * n)]
    assert a == b
    assert a[:n] != a[n:], "each epoch has its own order"


@pytest.mark.parametrize("workers, stop_at", [(0, 3), (2, 3), (2, 4), (2, 11)])
def test_resume_continues_with_the_same_batches(data, workers, stop_at):
    folder, model = data
    config = StreamConfig(batch_size=3, shuffle_buffer=6, num_workers=workers, seed=1)
    straight = take(TokenStream(folder, model, TEXT_LEN, config), stop_at + 8)

    first = TokenStream(folder, model, TEXT_LEN, config)
    head = take(first, stop_at)
    state = first.state_dict()
    resumed = TokenStream(folder, model, TEXT_LEN, config)
    resumed.load_state_dict(state)
    tail = take(resumed, 8)
    for expected, got in zip(straight, head + tail, strict=True):
        for key in ("text", "mask", "codes"):
            assert torch.equal(expected[key], got[key])


def test_each_epoch_trains_on_one_caption_drawn_from_seed_epoch_and_key(tmp_path, data):
    _, model = data
    folder = tmp_path / "tokens"
    shapes = ("circle", "square", "top")

    def three(i):
        return [f"{WORDS[i % 7]} {shape}" for shape in shapes]

    write_token_folder(folder, captions=three)
    tokenizer = CaptionTokenizer(model)

    def drawn(seed, epochs=3):  # per epoch: sample id -> the caption it was trained on
        config = StreamConfig(batch_size=2, shuffle_buffer=3, num_workers=2, seed=seed)
        stream = TokenStream(folder, model, 16, config)  # long enough for every caption whole
        n = stream.batches_per_epoch()
        batches = take(stream, n * epochs)
        return [{i: tokenizer.decode(t) for b in batches[e * n:(e + 1) * n] for i, t in zip(ids(b), b["text"])}
                for e in range(epochs)]

    epochs = drawn(seed=0)
    assert epochs == drawn(seed=0)
    assert all(c in three(i) for epoch in epochs for i, c in epoch.items())
    every_epoch = set.intersection(*(set(e) for e in epochs))
    assert len(every_epoch) > 20 and sum(len({e[i] for e in epochs}) > 1 for i in every_epoch) > len(every_epoch) / 2
    picks = [c.split()[1] for epoch in epochs for c in epoch.values()]
    assert all(picks.count(shape) > len(picks) / 5 for shape in shapes), "each caption is drawn"
    other = drawn(seed=1, epochs=1)[0]
    assert any(other[i] != epochs[0][i] for i in set(other) & set(epochs[0])), "the draw follows the seed"


def test_ranks_get_disjoint_samples_and_equal_epochs(data):
    folder, model = data
    config = StreamConfig(batch_size=3, shuffle_buffer=5, num_workers=2)
    streams = [TokenStream(folder, model, TEXT_LEN, config, rank=r, world_size=2) for r in range(2)]
    lengths = {s.batches_per_epoch() for s in streams}
    assert len(lengths) == 1
    per_rank = [{i for b in take(s, s.batches_per_epoch()) for i in ids(b)} for s in streams]
    assert not per_rank[0] & per_rank[1]


def test_truncation_and_rejects_are_counted(tmp_path, data):
    _, model = data
    folder = tmp_path / "tokens"
    write_token_folder(folder, bad=True)
    stream = TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=2, shuffle_buffer=0, num_workers=0))
    take(stream, stream.batches_per_epoch())  # reads every sample: the bad ones sit second in each shard
    assert stream.rejects.counts == {"empty_caption": len(SHARD_SIZES)}
    assert stream.truncated_captions > 0


def test_clear_errors_instead_of_hangs(data):
    folder, model = data
    with pytest.raises(ValueError, match="8 shards cannot feed 4 ranks x 3 workers = 12 readers"):
        TokenStream(folder, model, TEXT_LEN, StreamConfig(num_workers=3), rank=0, world_size=4)
    with pytest.raises(ValueError, match="made with another dVAE"):
        TokenStream(folder, model, TEXT_LEN, vae_fingerprint="0" * 64)
    stream = TokenStream(folder, model, TEXT_LEN, StreamConfig(num_workers=2), rank=0, world_size=2)
    with pytest.raises(ValueError, match="give load_state_dicts every rank's position"):
        stream.load_state_dict({"epoch": 0, "consumed": [0, 0, 0], "positions": [0, 0, 0], "next_worker": 0})


def test_resume_counts_each_reject_once(tmp_path, data):
    _, model = data
    folder = tmp_path / "tokens"
    write_token_folder(folder, bad=True)
    config = StreamConfig(batch_size=3, shuffle_buffer=4, num_workers=2)
    straight = TokenStream(folder, model, TEXT_LEN, config)
    take(straight, 9)
    first = TokenStream(folder, model, TEXT_LEN, config)
    take(first, 4)
    resumed = TokenStream(folder, model, TEXT_LEN, config)
    resumed.load_state_dict(first.state_dict())
    take(resumed, 5)
    first.rejects.merge(resumed.rejects)
    assert first.rejects.counts == straight.rejects.counts and straight.rejects.counts["empty_caption"] > 0


def test_resampled_mode_mixes_sources_by_weight_and_resumes(tmp_path, data):
    _, model = data
    write_token_folder(tmp_path / "a")
    write_token_folder(tmp_path / "b", first_index=1000)
    spec = f"{tmp_path / 'a'}::0.8,{tmp_path / 'b'}::0.2"
    config = StreamConfig(batch_size=4, shuffle_buffer=8, num_workers=2, resampled=True, epoch_samples=400)
    stream = TokenStream(spec, model, TEXT_LEN, config)
    assert stream.batches_per_epoch() == 100
    drawn = [i for b in take(stream, 200) for i in ids(b)]
    share_a = sum(i < 1000 for i in drawn) / len(drawn)
    assert 0.65 < share_a < 0.95, share_a

    first = TokenStream(spec, model, TEXT_LEN, config)
    head = take(first, 37)
    resumed = TokenStream(spec, model, TEXT_LEN, config)
    resumed.load_state_dict(first.state_dict())
    straight = take(TokenStream(spec, model, TEXT_LEN, config), 107)
    assert [ids(b) for b in head + take(resumed, 70)] == [ids(b) for b in straight]
    with pytest.raises(ValueError, match="resampled mode only"):
        TokenStream(spec, model, TEXT_LEN, StreamConfig(num_workers=0))


@pytest.mark.parametrize("workers, shuffle, world, stop_at", [(2, 0, 1, 5), (3, 4, 2, 1), (2, 6, 2, None)])
def test_resume_edge_cases(data, workers, shuffle, world, stop_at):
    """No shuffle buffer; several ranks; right after the first batch; exactly at an epoch's end."""
    folder, model = data
    config = StreamConfig(batch_size=2, shuffle_buffer=shuffle, num_workers=workers, seed=2)
    for rank in range(world):
        def make():
            return TokenStream(folder, model, TEXT_LEN, config, rank=rank, world_size=world)
        stop = make().batches_per_epoch() if stop_at is None else stop_at
        straight = take(make(), stop + 6)
        first = make()
        head = take(first, stop)
        resumed = make()
        resumed.load_state_dict(first.state_dict())
        assert [ids(b) for b in head + take(resumed, 6)] == [ids(b) for b in straight]


def test_a_damaged_shard_stops_every_rank_before_training(tmp_path, data):
    _, model = data
    folder = tmp_path / "tokens"
    write_token_folder(folder)
    path = folder / "00003.tar"
    path.write_bytes(path.read_bytes()[:-1024])
    for rank in range(2):  # every rank checks every shard, so none is left waiting on another
        with pytest.raises(ValueError, match="00003.tar is .* bytes, its manifest says"):
            TokenStream(folder, model, TEXT_LEN, StreamConfig(num_workers=1), rank=rank, world_size=2)


def test_codes_of_the_wrong_length_are_rejected(tmp_path, data):
    _, model = data
    folder = tmp_path / "tokens"
    write_token_folder(folder)
    writer = TokenShardWriter(folder / "odd.tar", codes_dtype(300))
    writer.write(TokenSample("short", np.zeros(3), "red", {}))
    for i in range(4):
        writer.write(TokenSample(f"fine{i}", np.zeros(GRID * GRID), "red", {}))
    writer.commit()
    write_shard_record(folder, ShardRecord("odd.tar", "src", 4, bytes=(folder / "odd.tar").stat().st_size))
    merge_manifest(folder, HEADER)
    stream = TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=2, shuffle_buffer=0, num_workers=0))
    take(stream, stream.batches_per_epoch())
    assert stream.rejects.counts["bad_codes"] == 1


def test_a_position_only_resumes_the_same_data_and_settings(data):
    folder, model = data
    stream = TokenStream(folder, model, TEXT_LEN, StreamConfig(num_workers=1, batch_size=2))
    take(stream, 2)
    other = TokenStream(folder, model, TEXT_LEN, StreamConfig(num_workers=1, batch_size=2, seed=9))
    with pytest.raises(ValueError, match="belongs to other data or settings"):
        other.load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="batch_size >= 1"):
        TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=0))


def _read_layout(folder, model, config, world, states=None, batches=None):
    """Each rank's batches of (the rest of) the epoch; with ``states``, after resuming from them."""
    streams = [TokenStream(folder, model, TEXT_LEN, config, rank=r, world_size=world) for r in range(world)]
    for stream in streams:
        if states is not None:
            stream.load_state_dicts(states)
    length = streams[0].batches_per_epoch() if batches is None else batches
    return [take(stream, length) for stream in streams], streams


@pytest.mark.parametrize("layouts", [[(2, 2), (1, 1)], [(1, 1), (2, 2)], [(2, 1), (3, 1), (1, 2)]])
def test_an_elastic_resume_reads_the_rest_of_the_epoch_once(data, layouts):
    """Stopped part way into an epoch on (ranks, workers), resumed on others: no sample twice,
    and only a tail short of the new readers' batches left unread."""
    folder, model = data
    batch, config_of = 2, lambda workers: StreamConfig(batch_size=batch, shuffle_buffer=6, num_workers=workers, seed=4)
    seen, states = [], None
    for hop, (world, workers) in enumerate(layouts):
        last = hop == len(layouts) - 1
        config = config_of(workers)
        probe = TokenStream(folder, model, TEXT_LEN, config, rank=0, world_size=world)
        if states is not None:
            probe.load_state_dicts(states)
        stop = None if last else max(1, probe.batches_per_epoch() // 2)
        read, streams = _read_layout(folder, model, config, world, states, stop)
        seen += [i for rank in read for b in rank for i in ids(b)]
        states = [stream.state_dict() for stream in streams]
    assert len(seen) == len(set(seen)), "a sample was read twice"
    world, workers = layouts[-1]
    unread = sum(SHARD_SIZES) - len(seen)
    assert 0 <= unread < world * workers * (batch + max(SHARD_SIZES)), unread
    # the next epoch is the new layout's own, as if it had run from the start
    fresh = [TokenStream(folder, model, TEXT_LEN, config_of(workers), rank=r, world_size=world) for r in range(world)]
    expected = [take(s, s.batches_per_epoch(0) + s.batches_per_epoch(1))[s.batches_per_epoch(0):] for s in fresh]
    next_epoch, _ = _read_layout(folder, model, config_of(workers), world, states, len(expected[0]))
    assert [[ids(b) for b in rank] for rank in next_epoch] == [[ids(b) for b in rank] for rank in expected]


def test_a_same_layout_resume_after_an_elastic_one_is_exact(data):
    folder, model = data
    config = StreamConfig(batch_size=2, shuffle_buffer=6, num_workers=2, seed=4)
    old = [TokenStream(folder, model, TEXT_LEN, config, rank=r, world_size=2) for r in range(2)]
    for stream in old:
        take(stream, 3)
    states = [stream.state_dict() for stream in old]

    def resumed():
        stream = TokenStream(folder, model, TEXT_LEN, config)
        stream.load_state_dicts(states)
        return stream

    straight = take(resumed(), 12)  # into the next epoch
    first = resumed()
    head = take(first, 2)
    again = TokenStream(folder, model, TEXT_LEN, config)
    again.load_state_dict(first.state_dict())
    assert [ids(b) for b in head + take(again, 10)] == [ids(b) for b in straight]
    other = TokenStream(folder, model, TEXT_LEN, StreamConfig(batch_size=2, shuffle_buffer=6, num_workers=2, seed=5))
    with pytest.raises(ValueError, match="belongs to other data or settings"):
        other.load_state_dicts(states)
