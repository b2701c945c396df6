"""The launcher environment, read in one place."""

import pytest

from dalle_ds.distributed import DistEnv, dist_env, slurm_array_task


@pytest.mark.parametrize("env, expected", [
    ({}, DistEnv(0, 1, 0)),
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, DistEnv(3, 8, 1)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"}, DistEnv(5, 16, 1)),
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "7", "SLURM_NTASKS": "9"}, DistEnv(1, 2, 0)),  # torchrun in srun
])
def test_rank_and_world_from_each_launcher(env, expected):
    assert dist_env(env) == expected


def test_bad_launcher_environment_is_a_clear_error():
    with pytest.raises(ValueError, match="WORLD_SIZE is not set"):
        dist_env({"RANK": "0"})
    with pytest.raises(ValueError, match="index 4 is outside \\[0, 4\\)"):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_slurm_array_positions():
    assert slurm_array_task({}) is None
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_STEP": "2"}
    assert slurm_array_task(env) == (3, 4)
