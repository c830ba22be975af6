"""Multi-process training: torchrun with 2 CPU processes (gloo) against one process.

Two DDP ranks, each running half of the global batch, must follow the same loss curve as one
process running both halves as micro-batches (``--accumulate 2``): the same shards, pool parts
and mask seeds, with the gradients averaged by DDP's all-reduce before the per-parameter
normalisation. Only the float summation order differs, hence a tolerance and not equality.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from nca_fast.train import train
from nca_fast.training.options import TrainOptions

ARGS = dict(size=8, pad=2, hidden=32, batch=4, pool_size=8, rollout_min=6, rollout_max=9,
            experiment="regenerate", damage=1, steps=4, save_every=2, seed=3, video_steps=4,
            backend="torch", device="cpu")


def _cli(opts: dict) -> list:
    argv = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if k in ("rollout_min", "rollout_max"):
            continue
        argv += [flag, str(v)]
    return argv + ["--rollout", str(opts["rollout_min"]), str(opts["rollout_max"])]


def test_two_ddp_ranks_match_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "nca_fast.train", *_cli(ARGS), "--threads", "1", "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    torch.set_num_threads(1)
    single = train(TrainOptions(**ARGS, accumulate=2), run_dir=tmp_path / "single")

    rows = (out / "loss.csv").read_text().strip().splitlines()[1:]
    ddp_losses = [float(r.split(",")[1]) for r in rows]
    assert len(ddp_losses) == ARGS["steps"]
    assert ddp_losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
    # Training moved the weights, and both runs moved them the same way.
    import nca_fast
    ddp_model = nca_fast.load(out / "model.safetensors")
    for (name, a), b in zip(single.model.state_dict().items(), ddp_model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert single.model.w2.weight.abs().max() > 0
    # Each rank wrote its own pool part; rank 0 also the shared state.
    assert (out / "checkpoint.safetensors").is_file()
    assert (out / "checkpoint.rank1.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert "torchrun --nproc_per_node=2 -m nca_fast.train" in (out / "command.txt").read_text()
