"""torchrun worker for fault tolerance: data-parallel training with a checkpoint every
CKPT_EVERY steps, resuming from the last one when restarted.

usage: restart.py STEPS CKPT_DIR OUT_DIR KILL_AT
On the first attempt (TORCHELASTIC_RESTART_COUNT == 0) rank 1 dies with os._exit at step
KILL_AT (-1: never); `torchrun --max-restarts=1` then restarts every rank, which resume from
CKPT_DIR/last.safetensors. (A hand-written loop: lf.save / lf.load; lf.fit's
ModelCheckpoint + resume_from="last" do the same.)
"""

from __future__ import annotations

import os

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, batches, digest, loss_fn, make_loader, make_params, write
from lightfn.checkpoint import load, save
from lightfn.optim.alias import adam

CKPT_EVERY = 4
steps, ckpt_dir, out, kill_at = int(arg(1)), arg(2), arg(3), int(arg(4))
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
mesh = dist_lf.init(timeout=60)
opt = adam(1e-2)
state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
last = os.path.join(ckpt_dir, "last.safetensors")
if os.path.exists(last):
    state = load(last, like=state)
state = dist_lf.replicate_state(state, mesh)
start = int(state.step)
step = dist_lf.data_parallel(lf.train_step(loss_fn, opt), mesh)
loader = make_loader().shard(mesh.rank, mesh.world_size)
for i, b in enumerate(batches(loader, steps, start=start), start=start):
    if attempt == 0 and mesh.rank == 1 and i == kill_at:
        os._exit(17)
    state, _ = step(state, b)
    if int(state.step) % CKPT_EVERY == 0:
        if mesh.is_main:
            save(last, state)
        dist_lf.barrier(mesh)
write(out, mesh.rank, {"rank": mesh.rank, "attempt": attempt, "resumed_from": start, "digest": digest(state.params), "step": int(state.step)})
