"""The pretokenize job: token shards, manifest, rejects, restarts and job partitioning."""

import json
import tarfile

import numpy as np
import pytest
import torch

from conftest import tiny_vae
from data_fixtures import good_sample, shard_members, write_corpus, write_shard
from dalle_ds.data.images import decode_image, images_to_float
from dalle_ds.data.manifest import Manifest
from dalle_ds.data.pretokenize import pretokenize
from dalle_ds.data.stream import StreamConfig, TokenStream
from dalle_ds.data.tokenizer import CaptionTokenizer, train_tokenizer
from dalle_ds.models.pretrained import model_fingerprint


@pytest.fixture
def corpus(tmp_path):
    shards = write_corpus(tmp_path / "raw", num_shards=3, per_shard=5)
    bad = [
        {"key": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"broken"},
        {"key": "no_caption", "png": good_sample(0)["png"]},
        {"key": "empty_caption", "png": good_sample(0)["png"], "txt": b"   "},
    ]
    shards.append(write_shard(tmp_path / "raw" / "00003.tar", [good_sample(100), *bad, good_sample(101)]))
    return [str(s) for s in shards]


def run(shards, vae, out, **kwargs):
    return pretokenize(shards, vae, out, batch_size=4, progress=False, **kwargs)


def test_token_shards_hold_the_vae_codes_captions_and_sources(corpus, tmp_path):
    vae = tiny_vae().eval()
    summary = run(corpus, vae, tmp_path / "tok")
    assert (summary.shards_written, summary.samples) == (4, 17)
    assert summary.rejects == {"corrupt_image": 1, "missing_caption": 1, "empty_caption": 1}

    manifest = Manifest.load(tmp_path / "tok")
    assert [s.name for s in manifest.shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert [s.samples for s in manifest.shards] == [5, 5, 5, 2]
    assert manifest.vae_fingerprint == model_fingerprint(vae)
    assert (manifest.grid_size, manifest.num_codes, manifest.codes_dtype) == (4, 32, "|u1")

    members = shard_members(tmp_path / "tok" / "00001.tar")
    source = good_sample(6)
    codes = np.frombuffer(members["000000006.codes"], dtype=np.uint8)
    image = images_to_float(decode_image(source["png"], 16)[None])
    assert np.array_equal(codes, vae.get_codebook_indices(image)[0].numpy())
    assert members["000000006.txt"] == source["txt"]
    assert json.loads(members["000000006.json"]) == {"source_key": "000000006", "source_shard": "00001.tar"}
    rejects = (tmp_path / "tok" / "00003.tar.rejects.jsonl").read_text().splitlines()
    assert {json.loads(r)["reason"] for r in rejects} == {"corrupt_image", "missing_caption", "empty_caption"}


def test_several_captions_all_reach_the_token_shard_and_train_dalle_draws_one(tmp_path):
    coco = [{**good_sample(i), "txt": f"a red square\r\n\n a square in red {i} \nred".encode()} for i in range(4)]
    write_shard(tmp_path / "raw.tar", coco + [good_sample(4)])
    run([str(tmp_path / "raw.tar")], tiny_vae(), tmp_path / "tok")
    members = shard_members(tmp_path / "tok" / "raw.tar")
    assert members["000000002.txt"] == b"a red square\na square in red 2\nred"  # clean lines, none dropped
    assert members["000000004.txt"] == good_sample(4)["txt"]  # one caption stays as it was

    model = train_tokenizer([line for s in coco for line in s["txt"].decode().split()], tmp_path / "t.model", 300)
    stream = TokenStream(tmp_path / "tok", model, 16, StreamConfig(batch_size=5, shuffle_buffer=0, num_workers=0))
    decode = CaptionTokenizer(model).decode
    drawn = [[decode(t) for t in next(iter(stream))["text"]] for _ in range(20)]  # an epoch per batch
    assert all(len({epoch[i] for epoch in drawn}) == 3 for i in range(4)), "each caption is drawn in some epoch"
    assert all(epoch[2] in ("a red square", "a square in red 2", "red") for epoch in drawn)


def test_rerun_skips_finished_shards_and_finishes_interrupted_ones(corpus, tmp_path):
    vae, out = tiny_vae(), tmp_path / "tok"
    run(corpus, vae, out)
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    # a job killed mid-shard leaves only its temporary; one killed before its sidecar leaves an
    # unmarked shard; a crash while writing a sidecar can leave it empty
    (out / "00002.tar.stats.json").unlink()
    (out / "00002.tar").rename(out / ".00002.tar.4242.0123456789ab.tmp")
    (out / "00003.tar.stats.json").unlink()
    (out / "00001.tar.stats.json").write_text("")
    summary = run(corpus, vae, out)
    assert (summary.shards_skipped, summary.shards_written) == (1, 3)
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before
    assert Manifest.load(out).total_samples == 17


def test_shards_from_damaged_input_are_used_and_retried(tmp_path):
    good = write_shard(tmp_path / "00000.tar", [good_sample(i) for i in range(3)])
    whole = good.read_bytes()
    good.write_bytes(whole[: len(whole) // 3])  # e.g. a download cut short
    out, vae = tmp_path / "tok", tiny_vae()
    first = run([str(good)], vae, out)
    assert first.shards_incomplete == 1 and "rerun to retry" in first.line()
    assert Manifest.load(out).shards[0].complete is False
    good.write_bytes(whole)  # the input is whole again
    second = run([str(good)], vae, out)
    assert (second.shards_written, second.shards_incomplete) == (1, 0)
    assert Manifest.load(out).total_samples == 3


def test_jobs_on_disjoint_halves_write_exactly_what_one_job_writes(corpus, tmp_path):
    vae = tiny_vae()
    run(corpus, vae, tmp_path / "one")
    for job in range(2):
        run(corpus, vae, tmp_path / "two", job_index=job, num_jobs=2)
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").glob("*.tar")}
    two = {p.name: p.read_bytes() for p in (tmp_path / "two").glob("*.tar")}
    assert one == two and len(one) == 4
    assert Manifest.load(tmp_path / "two").shards == Manifest.load(tmp_path / "one").shards


def test_refuses_a_folder_made_with_another_vae(corpus, tmp_path):
    run(corpus[:1], tiny_vae(), tmp_path / "tok")
    torch.manual_seed(123)
    with pytest.raises(ValueError, match="made with another dVAE"):
        run(corpus, tiny_vae(), tmp_path / "tok")


def test_unreadable_shards_are_counted_not_fatal(tmp_path):
    (tmp_path / "zero.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).bytes(3000))
    good = write_shard(tmp_path / "good.tar", [good_sample(i) for i in range(3)])
    with tarfile.open(good) as tar:
        third_image = tar.getmembers()[6]  # the third sample's image
    cut = third_image.offset_data + third_image.size // 2
    (tmp_path / "cut.tar").write_bytes(good.read_bytes()[:cut])
    shards = [str(tmp_path / n) for n in ("zero.tar", "noise.tar", "good.tar", "cut.tar")]
    summary = run(shards, tiny_vae(), tmp_path / "tok")
    assert summary.rejects["unreadable_shard"] == 2 and summary.rejects["truncated_shard"] == 1
    manifest = Manifest.load(tmp_path / "tok")
    assert {s.name: s.samples for s in manifest.shards}["good.tar"] == 3
    assert {s.name: s.samples for s in manifest.shards}["cut.tar"] == 2


@pytest.mark.parametrize("shard, name", [
    ("data/00001.tar", "00001.tar"), ("pipe:aws s3 cp s3://bucket/x/00002.tar -", "00002.tar"),
    ("https://host/x/00003.tar?sig=abc", "00003.tar"), ("/data/shard-7", "shard-7.tar"),
])
def test_output_names_follow_the_input_shard(shard, name):
    from dalle_ds.data.pretokenize import output_name

    assert output_name(shard) == name


def test_concurrent_jobs_share_one_folder(corpus, tmp_path):
    """Jobs running at the same time (a SLURM array) merge their shards into one manifest."""
    import multiprocessing

    vae = tiny_vae()
    context = multiprocessing.get_context("spawn")  # fork after torch has threads may deadlock
    jobs = [context.Process(target=run, args=(corpus, vae, tmp_path / "tok"), kwargs=dict(job_index=i, num_jobs=4))
            for i in range(4)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(timeout=120)
    assert [job.exitcode for job in jobs] == [0, 0, 0, 0]
    manifest = Manifest.load(tmp_path / "tok")
    assert [s.name for s in manifest.shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert manifest.total_samples == 17
