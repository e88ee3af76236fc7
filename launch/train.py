#!/usr/bin/env python
"""Train a JPEG-artifact removal network: DDP across GPUs/nodes (or CPU processes) via Accelerate.

Always start it with ``accelerate launch`` (one process per GPU, or 2 CPU processes)::

  # 2 CPU processes (gloo DDP), small recipe
  accelerate launch --config_file launch/accelerate/cpu2.yaml launch/train.py \\
      --config launch/configs/cpu.yaml --shards data/shards --run-dir runs/cpu
  # every GPU of one node
  accelerate launch --config_file launch/accelerate/1node.yaml --num_processes 8 launch/train.py \\
      --config launch/configs/gpu.yaml --run-dir runs/gpu
  # several machines: the same command on each, --machine_rank 0 on the main one
  accelerate launch --config_file launch/accelerate/multinode.yaml --num_machines 2 --num_processes 16 \\
      --machine_rank 0 --main_process_ip MAIN --main_process_port 29500 launch/train.py ...
  # under SLURM: see launch/slurm/train.sbatch (one `accelerate launch` per node)

Config: dataclass defaults < ``--config YAML`` < flags. The resolved config is written to
``RUN/config.yaml`` and sent to W&B. ``RUN`` receives::

  config.yaml  run_info.json  metrics.jsonl  panels/  wandb/
  checkpoints/step-XXXXXXX/   (Accelerate state + EMA + train_state.json + COMPLETE marker)
  model.safetensors + model.json   (EMA weights for `restorer restore`, exported with every checkpoint)

Resume: ``--resume auto`` (default) continues from the newest complete checkpoint in RUN (step, LR,
optimizer, EMA, RNG, data epoch); ``--resume PATH`` from that checkpoint; ``--resume none`` refuses
to start in a RUN that already has checkpoints. A resumed run starts a fresh pass over the data
with the next epoch number (the partly seen epoch is not replayed); rows of ``metrics.jsonl`` logged
after the checkpoint are dropped. Running a finished run again (its newest checkpoint at
``--max-steps`` and ``model.safetensors`` exported from it) does nothing.

Speed: ``--mixed-precision``, ``--channels-last`` and ``--compile`` default to ``auto``: chosen on
the machine at start (``restorer/hardware.py``: bf16 only where the GPU or CPU computes it
natively, compile on GPUs), printed with the reason and recorded in ``RUN/run_info.json`` and the
W&B config; an explicit value wins. A model that fails to compile trains eagerly (one warning).

Errors: one line ``error: ...`` each; an error met by one process only is printed by that process
as ``error: [rank R] ...``, and that process exits at once (the launcher then stops the others).

Optimizer steps: each step consumes ``batch_size x grad_accum`` patches on every process; the
LR schedule (linear warmup, cosine to ``min_lr_ratio``) is a function of this step, so it is not
affected by the number of processes. A step whose loss is not finite on any process is skipped on
all of them (the weights are untouched) and counted; ``--max-nonfinite`` in a row stop the run.

Stopping: SIGTERM or SIGUSR1 (SLURM preemption), sent to ``accelerate launch``, to the training
processes or to all of them, makes every process save one checkpoint at the next step boundary and
exit 0 ("stop requested"); DataLoader workers ignore both. A training process whose launcher dies
(SIGKILL, or SIGUSR1, which torchrun does not handle) stops the same way. ``--dist-timeout`` (600 s)
bounds every wait for another process: a process or machine that died or froze makes the others exit
with one ``error:`` line naming the collective they waited in; rerun the same command to resume.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch launch/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from restorer.train.entry import main, run  # noqa: E402,F401  (main: what tests and wrappers call)

if __name__ == "__main__":
    sys.exit(run(description=__doc__.split("\n\n")[0]))
