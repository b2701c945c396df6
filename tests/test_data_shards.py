import pytest

from dalle_ds.data.shards import (default_job_partition, expand_shards, parse_sources,
                                  split_for_job)


def touch(folder, *names):
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    return folder


@pytest.fixture
def data(tmp_path):
    return touch(tmp_path, "a/00002.tar", "a/00000.tar", "a/00001.tar", "a/notes.txt", "a/sub/00009.tar",
                 "b/x.tar", "b/y.tar")


def rel(paths, root):
    return [str(p).removeprefix(f"{root}/") for p in paths]


def test_brace_glob_folder_and_file(data):
    assert rel(expand_shards(f"{data}/a/{{00000..00002}}.tar").paths, data) == \
        ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert rel(expand_shards(f"{data}/a/*.tar").paths, data) == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert rel(expand_shards(f"{data}/a").paths, data) == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert rel(expand_shards(data / "b" / "y.tar").paths, data) == ["b/y.tar"]


def test_lists_and_commas_keep_pattern_order_and_drop_duplicates(data):
    expected = ["b/x.tar", "b/y.tar", "a/00000.tar", "a/00001.tar"]
    by_comma = expand_shards(f"{data}/b/*.tar, {data}/a/{{00000,00001}}.tar,{data}/b/x.tar")
    by_list = expand_shards([f"{data}/b", f"{data}/a/0000{{0,1}}.tar", data / "b" / "x.tar"])
    assert rel(by_comma.paths, data) == expected
    assert rel(by_list.paths, data) == expected


def test_missing_shards_in_a_brace_pattern_are_listed_not_fatal(data):
    shards = expand_shards(f"{data}/a/{{00000..00004}}.tar")
    assert rel(shards.paths, data) == ["a/00000.tar", "a/00001.tar", "a/00002.tar"]
    assert rel(shards.missing, data) == ["a/00003.tar", "a/00004.tar"]


def test_remote_urls_pass_through_brace_expanded(data):
    shards = expand_shards("https://host/s-{0..1}.tar,pipe:aws s3 cp s3://b/x.tar -")
    assert shards.paths == ["https://host/s-0.tar", "https://host/s-1.tar", "pipe:aws s3 cp s3://b/x.tar -"]
    assert shards.missing == []


@pytest.mark.parametrize("pattern, checked", [
    ("a/*.tar", "glob"),
    ("a/sub/missing.tar", "folder, file"),
    ("a/{5..7}.tar", "3 brace-expanded paths as folder, file"),
])
def test_nothing_matches_is_a_clear_error(tmp_path, pattern, checked):
    (tmp_path / "a" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError) as error:
        expand_shards(f"{tmp_path}/{pattern}")
    assert str(error.value) == f"no shards match '{tmp_path}/{pattern}' (checked: {checked})"


def test_one_empty_pattern_among_good_ones_is_an_error(data):
    with pytest.raises(ValueError, match="no shards match"):
        expand_shards([f"{data}/a", f"{data}/b/*.tarr"])


@pytest.mark.parametrize("spec", ["", " , ", [], b"a.tar", [1], "a/{0..3.tar"])
def test_malformed_specs(spec):
    with pytest.raises(ValueError):
        expand_shards(spec)


def test_weighted_sources_with_commas_inside_braces(data):
    sources = parse_sources(f"{data}/a/{{00000,00001}}.tar::0.7,{data}/b::0.3,{data}/a/sub")
    assert [rel(s.paths, data) for s in sources] == [["a/00000.tar", "a/00001.tar"], ["b/x.tar", "b/y.tar"],
                                                     ["a/sub/00009.tar"]]
    assert [s.weight for s in sources] == [0.7, 0.3, 1.0]


@pytest.mark.parametrize("weight", ["0", "-1", "abc", "nan", "inf", ""])
def test_bad_weights_name_the_source(data, weight):
    with pytest.raises(ValueError, match=f"bad weight '{weight}' in source"):
        parse_sources(f"{data}/b::{weight}")


def test_weight_without_pattern_and_no_sources():
    with pytest.raises(ValueError, match="no shard pattern"):
        parse_sources("::0.5")


@pytest.mark.parametrize("num_jobs", [1, 2, 3, 7, 12])
def test_job_partition_is_disjoint_and_complete(num_jobs):
    paths = [f"{i:05d}.tar" for i in range(10)]
    shares = [split_for_job(paths, j, num_jobs) for j in range(num_jobs)]
    assert sorted(p for share in shares for p in share) == paths
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("index, count", [(-1, 2), (2, 2), (0, 0), (True, 2), (0, 1.0)])
def test_bad_job_index(index, count):
    with pytest.raises(ValueError):
        split_for_job(["a.tar"], index, count)


LAUNCHER_VARS = ["SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP",
                 "RANK", "WORLD_SIZE"]


@pytest.mark.parametrize("env, expected", [
    ({}, (0, 1)),
    ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4", "RANK": "0", "WORLD_SIZE": "1"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "12", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "10"}, (2, 5)),
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_STEP": "2"}, (2, 3)),
])
def test_default_job_partition_from_env(monkeypatch, env, expected):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_job_partition() == expected


@pytest.mark.parametrize("env, message", [
    ({"SLURM_ARRAY_TASK_ID": "1"}, "SLURM_ARRAY_TASK_COUNT is not set"),
    ({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"}, "SLURM_ARRAY_TASK_ID='x' is not an integer"),
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"}, "not in a regular range"),
    ({"RANK": "1"}, "WORLD_SIZE is not set"),
    ({"RANK": "4", "WORLD_SIZE": "4"}, r"index 4 is outside \[0, 4\)"),
])
def test_default_job_partition_errors(monkeypatch, env, message):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        default_job_partition()
