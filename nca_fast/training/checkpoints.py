"""A training run's checkpoint: what ``Trainer`` writes every ``save_every`` steps and restores
on ``--resume``: the weights, the Adam state, the generator state, the pool (each rank its own
parts) and the loss history, with the guard's and the best model's records, so that a resumed
run ends bitwise equal to one that was never interrupted. The files: ``run_folder``.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Dict

import torch

from .options import RESUMABLE, TrainOptions
from .run_folder import (CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointError, checkpoint_path,
                         read_checkpoint, write_safetensors)


class Checkpoints:
    """The checkpoint methods of ``Trainer`` (a mixin): they read and restore its ``opts``,
    ``dist``, ``shards``, ``part``, ``run_dir``, ``model``, ``optimizer``, ``generator``,
    ``pool``, ``step``, ``losses``, timings, guard counters, ``best`` and ``dead_in_a_row``,
    and call its ``sanitize_pool`` before saving."""

    def _info(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "world_size": self.dist.world,
                "rank": self.dist.rank, "shards": self.shards,
                "options": self.opts.to_dict(), "model": self.model.config.to_dict(),
                "elapsed_s": self.elapsed, "cpu_s": self.cpu_time,
                "guard": {"counts": self.counts, "events": self.events,
                          "skipped_in_a_row": self.skipped_in_a_row},
                "best": self.best, "dead_in_a_row": self.dead_in_a_row}

    def save_checkpoint(self) -> pathlib.Path:
        """Write this rank's checkpoint atomically (rank 0's file also holds the shared state)."""
        path = checkpoint_path(self.run_dir, self.dist.rank)
        self.sanitize_pool()
        bad = [name for name, p in self.model.named_parameters() if not torch.isfinite(p).all()]
        if bad:        # cannot happen while the guard holds; never overwrite a good checkpoint
            raise FloatingPointError(f"parameters {bad} are not finite at step {self.step}; the "
                                     "checkpoint was not written (the previous one is kept)")
        tensors: Dict[str, torch.Tensor] = {}
        info = self._info()
        if self.pool is not None:
            K = self.opts.accumulate
            for k in range(K):
                s = self.dist.rank * K + k
                tensors[f"pool.{s}"] = self.pool[k * self.part:(k + 1) * self.part]
        if self.dist.rank == 0:
            for name, t in self.model.state_dict().items():
                tensors[f"model.{name}"] = t
            sd = self.optimizer.state_dict()
            plain = {}
            for pid, st in sd["state"].items():
                for key, v in st.items():
                    if torch.is_tensor(v):
                        tensors[f"optim.{pid}.{key}"] = v
                    else:
                        plain.setdefault(str(pid), {})[key] = v
            info["optimizer"] = {
                "param_groups": sd["param_groups"], "plain_state": plain,
                "tensor_state": sorted(k for k in tensors if k.startswith("optim."))}
            info["lr"] = self.lr_at(self.step)
            tensors["rng.generator"] = self.generator.get_state()
            tensors["history.loss"] = torch.tensor(self.losses, dtype=torch.float64)
        write_safetensors(path, tensors, {CHECKPOINT_KEY: json.dumps(info)})
        self.dist.barrier()
        return path

    def load_checkpoint(self) -> None:
        """Restore the state saved in ``run_dir`` (this rank's file and rank 0's shared state)."""
        own_path = checkpoint_path(self.run_dir, self.dist.rank)
        main_path = checkpoint_path(self.run_dir, 0)
        own, own_info = read_checkpoint(own_path)
        main, info = (own, own_info) if self.dist.rank == 0 else read_checkpoint(main_path)
        if info.get("world_size") != self.dist.world:
            raise CheckpointError(f"{main_path}: the run was saved with world size "
                                  f"{info.get('world_size')}, this process group has "
                                  f"{self.dist.world}; resume with the same number of processes")
        if own_info.get("step") != info.get("step"):
            raise CheckpointError(f"{own_path}: at step {own_info.get('step')} but {main_path} is "
                                  f"at step {info.get('step')} (interrupted while saving?)")
        saved = TrainOptions.from_dict(info["options"]).resolved()
        mine = dataclasses.replace(self.opts, out=saved.out,
                                   **{k: getattr(saved, k) for k in RESUMABLE})
        if mine != saved:
            diff = [f.name for f in dataclasses.fields(saved)
                    if getattr(saved, f.name) != getattr(mine, f.name)]
            raise CheckpointError(f"{main_path}: saved with different training options {diff}")
        try:
            self.model.load_state_dict(
                {k[len("model."):]: v for k, v in main.items() if k.startswith("model.")})
            opt = info["optimizer"]
            state: Dict[int, dict] = {}
            for key in opt["tensor_state"]:
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = main[key]
            for pid, extra in opt["plain_state"].items():
                state.setdefault(int(pid), {}).update(extra)
            self.optimizer.load_state_dict({"state": state, "param_groups": opt["param_groups"]})
            self.generator.set_state(main["rng.generator"])
            self.losses = [float(v) for v in main["history.loss"].tolist()]
            if self.pool is not None:
                K = self.opts.accumulate
                for k in range(K):
                    part = own[f"pool.{self.dist.rank * K + k}"]
                    if tuple(part.shape) != tuple(self.pool[:self.part].shape):
                        raise ValueError(f"pool part {self.dist.rank * K + k} has shape "
                                         f"{tuple(part.shape)}")
                    self.pool[k * self.part:(k + 1) * self.part] = part.to(self.device)
            self.step = int(info["step"])
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"{main_path}: incomplete or inconsistent checkpoint "
                                  f"({type(e).__name__}: {e})") from None
        if len(self.losses) != self.step:
            raise CheckpointError(f"{main_path}: holds {len(self.losses)} losses for step "
                                  f"{self.step}")
        self.elapsed = float(info.get("elapsed_s", 0.0))
        self.cpu_time = float(info.get("cpu_s", 0.0))
        guard = info.get("guard", {})
        self.counts = dict(guard.get("counts", {}))
        self.events = list(guard.get("events", [])) if self.dist.rank == 0 else []
        self.skipped_in_a_row = int(guard.get("skipped_in_a_row", 0))
        self.best = info.get("best")
        self.dead_in_a_row = int(info.get("dead_in_a_row", 0))
