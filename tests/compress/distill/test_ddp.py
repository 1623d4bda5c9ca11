"""Data-parallel distillation under torchrun: two CPU processes (gloo) train one student with a live teacher."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.paths import REPO

RECIPE = """\
steps: 3
batch_size: 1
train_iters: 1
eval_iters: 1
log_every: 1
checkpoint_every: 2
eval_every: 0
progress: false
student:
  kind: search_space
  preset: tiny
teacher:
  stand_in: random
  iters: 1
  config: {vit_size: vitt, hidden_dims: [32, 32, 32], max_disp: 64, mixed_precision: false}
data:
  train:
    num_samples: 4
    synthetic: {height: 32, width: 64, max_disp: 12, num_objects: 2}
  eval_samples: 1
"""


def test_torchrun_two_processes_train_one_student(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "compress.cli", "distill", str(recipe), f"run_dir={run_dir}",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3 and ckpt["world_size"] == 2
    # Both ranks ran: each contributed its own (differently seeded) RNG state to the checkpoint.
    assert len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]  # rank 0 alone writes the log
    assert all(math.isfinite(r["loss/total"]) and r["loss/total"] > 0 for r in train)
    assert {"loss/feature", "loss/cost_volume", "loss/output_teacher", "loss/init"} <= set(train[0])
    # The checkpoint was written once per checkpoint step (steps 2 and 3), not once per rank.
    assert [r["step"] for r in rows if r["kind"] == "checkpoint"] == [2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3]
    # Rank 0 holds the run directory's lock; the other rank writes into its folder.
    assert sorted(p.name for p in run_dir.iterdir()) == [".ffsc.lock", "checkpoint.pt", "config.yaml", "metrics.jsonl",
                                                         "student"]
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert proc.stdout.count('"student"') == 1  # the summary is printed by rank 0 only
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["steps"] == 3 and math.isfinite(summary["loss/total"])
