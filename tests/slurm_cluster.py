"""A real SLURM cluster on this host for tests and bench/slurm.py: launch/slurm/local_cluster.sh
brings up munged, slurmctld and two slurmd on 127.0.0.1 in a private state dir; jobs are submitted
with sbatch and followed with ``scontrol show job`` (no accounting database needed)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import clean_env, free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "slurm" / "local_cluster.sh"
SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
COMMANDS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo", "squeue")
INSTALL = "apt-get install slurmctld slurmd slurm-client munge"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def why_unavailable() -> str | None:
    """One line saying why a local cluster cannot be started here, or None."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if missing:
        return f"SLURM is not installed ({' '.join(missing)} missing; {INSTALL}, as .ci/run does)"
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd starts jobs as their user); .ci/run runs as root"
    return None


def free_port_run(n: int) -> int:
    """The first of ``n`` consecutive TCP ports free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            socks = []
            for port in range(first, first + n):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {n} consecutive free ports")


@dataclass
class Cluster:
    """A started local cluster: its state dir and the environment its commands need."""

    state: Path
    env: dict[str, str]
    up_seconds: float

    @classmethod
    def start(cls, state: Path, nodes: int = 2) -> Cluster:
        env = dict(os.environ)
        env.update(
            SLURM_LOCAL_DIR=str(state),
            SLURM_LOCAL_PORT=str(free_port_run(nodes + 1)),
            SLURM_LOCAL_NODES=str(nodes),
            SLURM_CONF=str(state / "slurm.conf"),
        )
        t0 = time.perf_counter()
        proc = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            raise RuntimeError(lines[-1] if lines else proc.stderr.strip()[-500:])
        return cls(state, env, time.perf_counter() - t0)

    def stop(self) -> None:
        subprocess.run(["bash", str(SCRIPT), "down"], env=self.env, capture_output=True, text=True, timeout=120)

    def run(self, *cmd: str) -> str:
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def submit(self, train_args: list[str], out: Path, *sbatch_flags: str, env: dict[str, str]) -> str:
        """``sbatch FLAGS launch/slurm/train.sbatch TRAIN_ARGS`` from the repository; the job id.
        ``env`` is the job's environment (sbatch passes the submitter's on)."""
        accelerate = Path(sys.executable).with_name("accelerate")
        job_env = {**env, "SLURM_CONF": self.env["SLURM_CONF"], "ACCELERATE": str(accelerate)}
        cmd = ["sbatch", "--parsable", f"--output={out}", *sbatch_flags, str(SBATCH), *train_args]
        proc = subprocess.run(cmd, cwd=REPO, env=job_env, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch: exit {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        line = self.run("scontrol", "show", "job", "--oneliner", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state (a requeued job passes through PENDING again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info["JobState"] in FINAL:
                return info
            time.sleep(0.5)
        self.run("scancel", job_id)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {self.job(job_id)['JobState']}")

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the daemons' logs (for a failing test's message)."""
        parts = []
        for log in sorted((self.state / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(parts)


def job_env(tmp: Path) -> dict[str, str]:
    """A job's environment: no W&B credentials (offline), a free rendezvous port, and nothing that
    would choose the processes for train.sbatch (it must find out itself that there is no GPU)."""
    env = clean_env(tmp, MAIN_PORT=str(free_port()))
    for name in ("ACCELERATE_USE_CPU", "PROCS_PER_NODE", "ACCELERATE"):
        env.pop(name, None)
    return env


def wait_for_line(path: Path, pattern: str, timeout: float, job_state=None) -> re.Match:
    """The first match of ``pattern`` in the file ``path`` as it grows (a job's output)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            found = re.search(pattern, path.read_text(errors="replace"), re.MULTILINE)
            if found:
                return found
        if job_state is not None and job_state() in FINAL:
            break
        time.sleep(0.2)
    text = path.read_text(errors="replace")[-3000:] if path.exists() else "(no output file)"
    raise TimeoutError(f"no line matching {pattern!r} in {path}:\n{text}")
