"""The launch/ scripts: shell syntax, and what each must hand on (torchrun.sh runs for real in
tests/test_train_dalle.py)."""

import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_launcher_is_valid_bash(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)


def test_slurm_training_checkpoints_on_signals_and_requeues():
    text = (LAUNCH / "slurm_train.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@" in text and "#SBATCH --requeue" in text
    assert "scontrol requeue" in text and "--resume" in text and "trap requeue USR1" in text
    assert "kill -TERM" in text and "--shutdown-timeout" in text  # torchrun forwards TERM, not USR1


def test_pretokenize_array_passes_no_job_index():
    """Each array task's share comes from SLURM_ARRAY_TASK_ID/COUNT (dalle_ds.distributed)."""
    text = (LAUNCH / "slurm_pretokenize.sbatch").read_text()
    assert "dalle-ds pretokenize" in text and "--job-index" not in text and "#SBATCH --array" not in text
