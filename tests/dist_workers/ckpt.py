"""torchrun worker for sharded checkpoints across world sizes.

usage: ckpt.py save DIR        train 5 fully sharded steps, save_sharded(DIR/sharded), also
                               DIR/gathered.safetensors (gather=True) and, from rank 0,
                               DIR/reference.safetensors (the unsharded state, ordinary lf.save)
       ckpt.py load DIR OUT    load_sharded(DIR/sharded) and DIR/gathered.safetensors onto this
                               mesh, unshard, and compare every leaf with DIR/reference.safetensors
"""

from __future__ import annotations

import os

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, batches, loss_fn, make_loader, make_params, write
from lightfn.checkpoint import load, save
from lightfn.optim.alias import adam

mode, folder = arg(1), arg(2)
mesh = dist_lf.init(timeout=60)
opt = adam(1e-2)
fresh = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)

if mode == "save":
    state = dist_lf.shard_state(fresh, mesh)
    step = dist_lf.fully_sharded(lf.train_step(loss_fn, opt), mesh)
    for b in batches(make_loader().shard(mesh.rank, mesh.world_size), 5):
        state, _ = step(state, b)
    dist_lf.save_sharded(os.path.join(folder, "sharded"), state, mesh, metadata={"note": "test"})
    dist_lf.save_sharded(os.path.join(folder, "gathered.safetensors"), state, mesh, gather=True)
    full = dist_lf.unshard_state(state, mesh)
    if mesh.is_main:
        save(os.path.join(folder, "reference.safetensors"), full)
else:
    out = arg(3)
    like = dist_lf.shard_state(fresh, mesh)
    reference = load(os.path.join(folder, "reference.safetensors"), like=fresh)
    result: dict = {"rank": mesh.rank, "world_size": mesh.world_size}
    for name in ("sharded", "gathered.safetensors"):
        restored = dist_lf.load_sharded(os.path.join(folder, name), like, mesh)
        full = dist_lf.unshard_state(restored, mesh)
        diffs = [
            lf.tree.keystr(p)
            for (p, a), b in zip(lf.tree.leaves_with_path(full), lf.tree.leaves(reference))
            if not (isinstance(a, torch.Tensor) and torch.equal(a, b) and a.dtype == b.dtype)
        ]
        result[name] = {"unequal": diffs, "leaves": len(lf.tree.leaves(full)), "step": int(full.step),
                        "shard": int(restored.params.shard.numel())}
    write(out, mesh.rank, result)
