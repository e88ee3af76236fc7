"""Times of launch/slurm/train.sbatch on a real local SLURM cluster (launch/slurm/local_cluster.sh:
munged, slurmctld, two slurmd on 127.0.0.1, CPU-only; root and Debian's slurmctld slurmd
slurm-client munge packages needed): cluster bring-up, a 1-node and a 2-node job of a tiny model
(submit to COMPLETED), and a preemption: `scancel --signal=USR1 --batch` mid-run, then the times to
the checkpoint ("stop requested"), to the requeue (Restarts=1), to the requeued job's start and to
its resume from that checkpoint. The local cluster waits cred_expire + 1 = 6 s before a requeued job
may start (SLURM's default cred_expire, 120 s, makes that 121 s on a stock cluster).

examples:
  python bench/slurm.py                       # root, with slurmctld slurmd slurm-client munge installed
  python bench/slurm.py --steps 4 --preempt-steps 200

The last line is ``slurm_preempt_to_resumed_s: <seconds>``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from conftest import FIT_ARGS, write_shards  # noqa: E402 (the tests' tiny shards and recipe)
from slurm_cluster import Cluster, job_env, wait_for_line, why_unavailable  # noqa: E402

from benchcli import parser  # noqa: E402

TIMEOUT = 900.0


def timed_job(cluster: Cluster, work: Path, name: str, args: list[str], *flags: str) -> float:
    out = work / f"{name}.out"
    t0 = time.perf_counter()
    job = cluster.submit(args, out, *flags, env=job_env(work))
    info = cluster.wait(job, TIMEOUT)
    if info["JobState"] != "COMPLETED":
        raise SystemExit(f"error: {name}: job {job} ended {info['JobState']}; output in {out}")
    return time.perf_counter() - t0


def preemption(cluster: Cluster, work: Path, args: list[str]) -> dict[str, float]:
    """Seconds from the signal to each milestone of a preempted 2-node job."""
    out = work / "preempt.out"
    job = cluster.submit(args, out, env=job_env(work))
    state = lambda: cluster.job(job)["JobState"]  # noqa: E731
    wait_for_line(out, r"^step 3/", TIMEOUT, state)
    t0 = time.perf_counter()
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    times = {}
    wait_for_line(out, r"^stop requested", TIMEOUT, state)
    times["checkpoint saved"] = time.perf_counter() - t0
    while cluster.job(job)["Restarts"] == "0":
        time.sleep(0.1)
    times["job requeued"] = time.perf_counter() - t0
    wait_for_line(out, r"restart 1:", TIMEOUT)
    times["requeued job started"] = time.perf_counter() - t0
    wait_for_line(out, r"^resumed from", TIMEOUT)
    times["resumed from the checkpoint"] = time.perf_counter() - t0
    if cluster.wait(job, TIMEOUT)["JobState"] != "COMPLETED":
        raise SystemExit(f"error: preempted job {job} did not complete; output in {out}")
    times["completed"] = time.perf_counter() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=4, help="training steps of the 1-node and 2-node jobs")
    ap.add_argument("--preempt-steps", type=int, default=200, help="--max-steps of the preempted job")
    args = ap.parse_args(argv)
    reason = why_unavailable()
    if reason:
        raise SystemExit(f"error: {reason}")
    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp:
        work = Path(tmp)
        shards = write_shards(work / "shards", splits={"train": 8, "val": 2}, samples_per_shard=2, tile=48)
        t0 = time.perf_counter()
        cluster = Cluster.start(work / "cluster")
        rows = {"cluster up": cluster.up_seconds}
        try:

            def train(run: str, steps: int) -> list[str]:
                common = ["--shards", str(shards), "--run-dir", str(work / run), *FIT_ARGS, "--tracker", "none"]
                return [*common, "--max-steps", str(steps), "--val-every", str(steps), "--save-every", "1000"]

            rows["1-node job, 1 process"] = timed_job(cluster, work, "one", train("one", args.steps), "--nodes=1")
            rows["2-node job, 2 processes"] = timed_job(cluster, work, "two", train("two", args.steps))
            preempt = preemption(cluster, work, train("preempt", args.preempt_steps))
        finally:
            t_down = time.perf_counter()
            cluster.stop()
            rows["cluster down"] = time.perf_counter() - t_down
    print(f"## local SLURM cluster (2 nodes on 127.0.0.1), tiny model, {args.steps} steps per job")
    for name, seconds in rows.items():
        print(f"{name:40s} {seconds:7.1f} s")
    print(f"## preemption (2 nodes, --max-steps {args.preempt_steps}), seconds after the signal")
    for name, seconds in preempt.items():
        print(f"{name:40s} {seconds:7.1f} s")
    print(f"{'all of it':40s} {time.perf_counter() - t0:7.1f} s")
    print(f"slurm_preempt_to_resumed_s: {preempt['resumed from the checkpoint']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
