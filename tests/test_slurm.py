"""launch/slurm/train.sbatch on a real SLURM cluster (launch/slurm/local_cluster.sh: munged,
slurmctld and two slurmd on 127.0.0.1, CPU-only): a 1-node and a 2-node job complete, and a job
preempted with ``scancel --signal=USR1 --batch`` saves a checkpoint, requeues itself and completes at
--max-steps in the same W&B run. Skips with one line where SLURM is not installed or not root
(.ci/run installs it); with RESTORER_REQUIRE_SLURM=1 (set by .ci/run after a good install) a
cluster that cannot be brought up fails instead."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import FIT_ARGS, write_shards
from slurm_cluster import Cluster, job_env, wait_for_line, why_unavailable

pytestmark = pytest.mark.slow
JOB_TIMEOUT = 600  # s: a job here takes 30-60 s on 2 loaded cores; the bound is 10x that
REQUIRED = os.environ.get("RESTORER_REQUIRE_SLURM") == "1"
if why_unavailable() and not REQUIRED:
    pytest.skip(why_unavailable(), allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = why_unavailable()
    assert reason is None, f"RESTORER_REQUIRE_SLURM=1 but {reason}"
    try:
        started = Cluster.start(tmp_path_factory.mktemp("slurm"))
    except RuntimeError as exc:
        if REQUIRED:
            raise
        pytest.skip(f"the local SLURM cluster did not start: {exc}")
    yield started
    started.stop()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """8 train tiles of 48 px in 4 shards (2 batches per rank and epoch at world size 2), 2 val tiles."""
    return write_shards(
        tmp_path_factory.mktemp("slurm-shards") / "shards", splits={"train": 8, "val": 2}, samples_per_shard=2, tile=48
    )


def train_args(shards: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--shards",
        str(shards),
        "--run-dir",
        str(run),
        *FIT_ARGS,
        "--max-steps",
        str(steps),
        "--val-every",
        str(steps),
        *extra,
    ]


def finished(cluster: Cluster, job: str, out: Path) -> dict[str, str]:
    info = cluster.wait(job, JOB_TIMEOUT)
    text = out.read_text(errors="replace") if out.exists() else "(no output)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{info['JobState']} {info['ExitCode']}\n{text[-4000:]}\n{cluster.log_tail()}"
    )
    return info


def test_one_node_job_runs_a_process_per_task(cluster, shards, tmp_path):
    """--ntasks-per-node 2 on a CPU node: 2 training processes on the node, DDP over gloo."""
    out, run = tmp_path / "job.out", tmp_path / "run"
    args = train_args(shards, run, 4, "--tracker", "none")
    job = cluster.submit(args, out, "--nodes=1", "--ntasks-per-node=2", env=job_env(tmp_path))
    info = finished(cluster, job, out)
    text = out.read_text()
    assert "nodes=1 processes/node=2 (cpu) processes=2" in text
    assert "done: 4 steps" in text
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert info["NumNodes"] == "1" and info["Restarts"] == "0"


def test_two_node_job_spans_both_nodes(cluster, shards, tmp_path):
    """The script's defaults (2 nodes, one task each): one process on each node, rendezvous on node1."""
    out, run = tmp_path / "job.out", tmp_path / "run"
    args = train_args(shards, run, 4, "--tracker", "none")
    job = cluster.submit(args, out, env=job_env(tmp_path))
    info = finished(cluster, job, out)
    text = out.read_text()
    assert "nodes=2 processes/node=1 (cpu) processes=2" in text
    assert "done: 4 steps" in text
    assert info["NodeList"] == "node[1-2]"
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2


def test_preempted_job_saves_requeues_and_completes(cluster, shards, tmp_path):
    """Preempted twice, it ends at --max-steps in one W&B run (offline). First mid-run, SIGUSR1 to the
    training processes only (`scancel --signal=USR1 JOBID`): every rank saves at the next step and
    exits 0, and the script requeues the job from rank 0's "stop requested" line. Then SIGUSR1 to the
    batch script (`--batch`, as `#SBATCH --signal=B:USR1@120` does) as soon as the requeued job starts,
    while its processes are still starting and ignore it: the script repeats it until they stop, and
    requeues again. The third run resumes and completes."""
    out, run, steps = tmp_path / "job.out", tmp_path / "run", 200
    args = train_args(shards, run, steps, "--save-every", "1000", "--num-workers", "1")
    job = cluster.submit(args, out, env=job_env(tmp_path))
    state = lambda: cluster.job(job)["JobState"]  # noqa: E731
    wait_for_line(out, r"^step 3/", JOB_TIMEOUT, state)
    cluster.run("scancel", "--signal=USR1", job)
    wait_for_line(out, r"restart 1:", JOB_TIMEOUT, state)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    info = finished(cluster, job, out)
    text = out.read_text()
    assert int(info["Restarts"]) == 2
    saved = [int(n) for n in re.findall(r"^stop requested: saved step (\d+)", text, re.MULTILINE)]
    assert len(saved) == 2 and 3 <= saved[0] <= saved[1] < steps, saved
    for step in saved:
        assert f"at step {step} " in text and (run / "checkpoints" / f"step-{step:07d}").is_dir()
    assert text.count("requeueing job") == 2 and f"done: {steps} steps" in text
    assert json.loads((run / "run_info.json").read_text())["end_step"] == steps
    runs = {p.name.rsplit("-", 1)[-1] for p in (run / "wandb").glob("offline-run-*")}
    assert len(runs) == 1, f"W&B runs: {runs}"
