import io
import os
import pickle
import random
import tarfile

import pytest

from dalle_ds.data.errors import Rejected
from dalle_ds.data.tar_reader import RawSample, RejectCounts, image_and_captions, iter_captions, iter_shard


def write_tar(path, members):
    """members: (name, bytes) in order, or (name, None) for a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def img2dataset_members(n):
    members = []
    for i in range(n):
        key = f"{i:09d}"
        members += [(f"{key}.jpg", bytes([i]) * 1000), (f"{key}.txt", f"caption {i}".encode()),
                    (f"{key}.json", b'{"key": "%s"}' % key.encode())]
    return members


def read(path):
    rejects = RejectCounts()
    return list(iter_shard(str(path), rejects)), rejects.counts


def test_good_shard_round_trip(tmp_path):
    members = img2dataset_members(4)
    path = write_tar(tmp_path / "s.tar", members)
    samples, rejects = read(path)
    assert [s.key for s in samples] == [f"{i:09d}" for i in range(4)]
    assert all(s.shard == path for s in samples)
    assert [f"{s.key}.{ext}" for s in samples for ext in s.files] == [name for name, _ in members]
    assert samples[2].files == {"jpg": bytes([2]) * 1000, "txt": b"caption 2", "json": b'{"key": "000000002"}'}
    assert rejects == {}


def test_keys_folders_extensions_and_skipped_entries(tmp_path):
    path = write_tar(tmp_path / "s.tar", [
        ("./", None), ("./a.JPG", b"1"), ("./a.txt", b"x"), ("part", None), ("part/b.seg.png", b"2"),
        (".hidden.txt", b"h"), ("__meta__", b"m"), ("part/._b.jpg", b"mac"), ("README", b"no extension"),
        ("part/b.txt", b"y"),
    ])
    samples, rejects = read(path)
    assert [(s.key, s.files) for s in samples] == [("a", {"jpg": b"1", "txt": b"x"}),
                                                   ("part/b", {"seg.png": b"2", "txt": b"y"})]
    assert rejects == {}


def test_repeated_file_in_a_sample_is_counted_and_dropped(tmp_path):
    path = write_tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.txt", b"x"), ("a.txt", b"again")])
    samples, rejects = read(path)
    assert samples[0].files == {"jpg": b"1", "txt": b"x"}
    assert rejects == {"duplicate_member": 1}


def member_offsets(path):
    with tarfile.open(path) as tar:
        return [(m.offset, m.offset_data, m.size) for m in tar.getmembers()]


def cut(path, offset):
    with open(path, "r+b") as f:
        f.truncate(offset)


# Where a shard of 20 samples (jpg, txt, json each) is cut, relative to the 10th sample's members
# (27 jpg, 28 txt, 29 json) and the 11th's first (30): what arrives whole of the 10th sample.
CUTS = {
    "inside_the_11th_header": (lambda m: m[30][0] + 100, ("jpg", "txt", "json")),
    "at_the_11th_header": (lambda m: m[30][0], ("jpg", "txt", "json")),
    "in_the_10th_json_padding": (lambda m: m[29][1] + m[29][2] + 1, ("jpg", "txt", "json")),
    "inside_the_10th_json_data": (lambda m: m[29][1] + m[29][2] // 2, ("jpg", "txt")),
    "inside_the_10th_json_header": (lambda m: m[29][0] + 300, ("jpg", "txt")),
    "at_the_10th_caption_header": (lambda m: m[28][0], ("jpg",)),
    "inside_the_10th_caption_data": (lambda m: m[28][1] + 3, ("jpg",)),
    "inside_the_10th_image_data": (lambda m: m[27][1] + 500, ()),
}


@pytest.mark.parametrize("remote", [False, True], ids=["seeking", "streaming"])
@pytest.mark.parametrize("where", CUTS)
def test_a_cut_keeps_the_sample_being_read_when_its_image_and_caption_are_whole(tmp_path, where, remote):
    members = img2dataset_members(20)
    path = write_tar(tmp_path / "s.tar", members)
    offset, whole = CUTS[where]
    cut(path, offset(member_offsets(path)))
    samples, rejects = read(f"pipe:cat {path}" if remote else path)
    originals = dict(members)
    nine_first = [f"{i:09d}" for i in range(9)]
    assert [s.key for s in samples[:9]] == nine_first
    assert all(s.files == {e: originals[f"{s.key}.{e}"] for e in ("jpg", "txt", "json")} for s in samples[:9])
    tenth = "000000009"
    if {"jpg", "txt"} <= set(whole):  # kept, with exactly the files that arrived whole
        assert [s.key for s in samples] == nine_first + [tenth]
        assert samples[9].files == {e: originals[f"{tenth}.{e}"] for e in whole}
        assert rejects == {"truncated_shard": 1}
    else:  # really incomplete: dropped, and counted as such
        assert [s.key for s in samples] == nine_first
        assert rejects == {"truncated_shard": 1, "incomplete_sample": 1}


def test_damage_is_logged_per_shard_and_a_dropped_sample_by_its_key(tmp_path):
    path = write_tar(tmp_path / "s.tar", img2dataset_members(4))
    _, data_start, size = member_offsets(path)[6]  # the image of the third sample
    cut(path, data_start + size // 2)
    rejects = RejectCounts()
    assert [s.key for s in iter_shard(path, rejects)] == ["000000000", "000000001"]
    assert list(rejects.records) == [("", path, "truncated_shard"), ("000000002", path, "incomplete_sample")]


@pytest.mark.parametrize("content", [None, b"", os.urandom(5000), b"not a tar at all\n" * 100])
def test_unreadable_shards_are_counted_not_raised(tmp_path, content):
    path = tmp_path / "bad.tar"
    if content is not None:
        path.write_bytes(content)
    samples, rejects = read(path)
    assert samples == []
    assert rejects == {"unreadable_shard": 1}


def test_a_folder_or_an_unknown_url_is_unreadable(tmp_path):
    assert read(tmp_path) == ([], {"unreadable_shard": 1})
    assert read("s3://bucket/x.tar") == ([], {"unreadable_shard": 1})


def test_empty_tar_is_a_valid_shard_without_samples(tmp_path):
    assert read(write_tar(tmp_path / "empty.tar", [])) == ([], {})


def test_corrupted_shards_never_raise(tmp_path):
    with open(write_tar(tmp_path / "good.tar", img2dataset_members(3)), "rb") as f:
        good = f.read()
    rng = random.Random(0)
    path = tmp_path / "bad.tar"
    for _ in range(200):
        data = bytearray(good)
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data[:rng.randrange(len(data) + 1)]))
        read(path)


def sample(**files):
    return RawSample("k", "s.tar", files)


def test_image_and_captions():
    assert image_and_captions(sample(png=b"p", jpg=b"j", txt=b"  a cat \n")) == ("jpg", b"j", ["a cat"])
    assert image_and_captions(sample(webp=b"w", txt=b"\xef\xbb\xbf" + "café".encode())) == ("webp", b"w", ["café"])


def test_each_non_empty_line_is_a_caption(tmp_path):
    coco = b"A cat on a mat.\r\n\n  A tabby cat, lying down. \n \t\nA cat."
    assert image_and_captions(sample(jpg=b"j", txt=coco))[2] == ["A cat on a mat.", "A tabby cat, lying down.",
                                                                 "A cat."]
    path = write_tar(tmp_path / "s.tar", [("a.jpg", b"1"), ("a.txt", coco), ("b.jpg", b"2"), ("b.txt", b"a dog"),
                                          ("c.jpg", b"3"), ("c.txt", b"\n \n")])
    rejects = RejectCounts()
    assert list(iter_captions([path], rejects)) == ["A cat on a mat.", "A tabby cat, lying down.", "A cat.", "a dog"]
    assert rejects.counts == {"empty_caption": 1}


@pytest.mark.parametrize("files, reason", [
    ({"txt": b"a cat", "json": b"{}"}, "missing_image"),
    ({"seg.png": b"p", "txt": b"a cat"}, "missing_image"),
    ({"jpg": b"j", "json": b"{}"}, "missing_caption"),
    ({"jpg": b"j", "txt": b"caf\xe9"}, "caption_not_utf8"),
    ({"jpg": b"j", "txt": b""}, "empty_caption"),
    ({"jpg": b"j", "txt": b" \n\t "}, "empty_caption"),
])
def test_rejected_samples(files, reason):
    with pytest.raises(Rejected) as error:
        image_and_captions(sample(**files))
    assert error.value.reason == reason


def test_reject_counts_merge_and_pickle():
    a, b = RejectCounts(keep_records=3), RejectCounts()
    a.add("missing_image", "k1", "s1")
    b.add("missing_image", "k2", "s2")
    b.add("empty_caption", "k3", "s2")
    a.merge(b)
    a.merge(pickle.loads(pickle.dumps(b)).as_dict())  # as a DataLoader worker would hand it back
    assert a.as_dict()["counts"] == {"missing_image": 3, "empty_caption": 2}
    assert a.as_dict()["records"] == [("k3", "s2", "empty_caption"), ("k2", "s2", "missing_image"),
                                      ("k3", "s2", "empty_caption")]


def test_absurd_member_sizes_are_counted_not_raised(tmp_path, monkeypatch):
    path = write_tar(tmp_path / "s.tar", img2dataset_members(3))
    data = bytearray(open(path, "rb").read())
    header = member_offsets(path)[3][0]  # the second sample's image header
    data[header + 124:header + 136] = b"\x80" + (1 << 80).to_bytes(11, "big")  # base-256 size
    data[header + 148:header + 156] = b"        "
    data[header + 148:header + 155] = f"{sum(data[header:header + 512]):06o}\0".encode()
    (tmp_path / "huge.tar").write_bytes(bytes(data))
    samples, counts = read(tmp_path / "huge.tar")
    assert [s.key for s in samples] == ["000000000"] and sum(counts.values()) >= 1

    monkeypatch.setattr("dalle_ds.data.tar_reader.MAX_MEMBER_BYTES", 500)
    samples, counts = read(path)
    assert counts["member_too_large"] == 3 and all("jpg" not in s.files for s in samples)
