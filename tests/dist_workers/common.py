"""Shared pieces of the torchrun worker scripts (not collected by pytest: no test_ prefix)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch

import lightfn as lf
from lightfn.data import ArrayLoader
from lightfn.optim.alias import adam

GLOBAL_BATCH = 16


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "enc": {"w": torch.randn(8, 13, generator=g, dtype=dtype) * 0.3, "b": torch.zeros(13, dtype=dtype)},
        "dec": {"w": torch.randn(13, 3, generator=g, dtype=dtype) * 0.3, "b": torch.zeros(3, dtype=dtype)},
    }


def loss_fn(params, batch):
    x, y = batch
    h = torch.tanh(x @ params["enc"]["w"] + params["enc"]["b"])
    pred = h @ params["dec"]["w"] + params["dec"]["b"]
    err = pred - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def make_data(n: int = 160, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :3]) + 0.1 * torch.randn(n, 3, generator=g)
    return x, y


def make_loader(seed: int = 0) -> ArrayLoader:
    return ArrayLoader(make_data(), batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True, seed=seed)


def batches(loader: ArrayLoader, steps: int, start: int = 0):
    """Batches ``start .. steps-1`` of an endless walk over epochs (each in its own order),
    so a resumed run at step ``start`` sees exactly the batches an uninterrupted one does."""
    per_epoch = len(loader)
    step = start
    while step < steps:
        epoch, offset = divmod(step, per_epoch)
        for b in loader.iter_epoch(epoch, start=offset):
            yield b
            step += 1
            if step == steps:
                return


def reference(steps: int, lr: float = 1e-2) -> dict:
    """Single-process training on the full global batches: what every strategy must equal."""
    opt = adam(lr)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    step = lf.train_step(loss_fn, opt)
    for b in batches(make_loader(), steps):
        state, _ = step(state, b)
    return state.params


def digest(tree) -> dict[str, str]:
    return {lf.tree.keystr(p): hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest() for p, x in lf.tree.leaves_with_path(tree)}


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(lf.tree.leaves(a), lf.tree.leaves(b)))


def write(out_dir: str, rank: int, data: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(data, f)


def arg(i: int, default: str = "") -> str:
    return sys.argv[i] if len(sys.argv) > i else default
