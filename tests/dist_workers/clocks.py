"""torchrun worker: time-based decisions in a data-parallel fit whose ranks run at different speeds.

usage: clocks.py OUT_DIR
Rank 1 sleeps 20 ms after every step, so the ranks' own clocks drift apart. fit's per-step
vote shares one clock, so ModelCheckpoint(train_time_interval=...) saves at the same steps on
every rank (a save reduces the metric sums: a collective) and max_time stops every rank at
the same step. Writes OUT_DIR/rank<r>.json: the saved checkpoints, the final step.
"""

from __future__ import annotations

import os
import time

import torch

import lightfn as lf
from common import arg, loss_fn, make_loader, make_params, write
from lightfn.callbacks import Callback, ModelCheckpoint
from lightfn.optim.alias import adam

out_dir = arg(1)
rank = int(os.environ["RANK"])


class SlowRank1(Callback):
    first_step_at: float | None = None  # fit's shared clock at the end of step 1

    def on_train_batch_end(self, ctx):
        if self.first_step_at is None:
            self.first_step_at = ctx.elapsed
        if rank == 1:
            time.sleep(0.02)


opt = adam(1e-2)
state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
# One step outside fit first: the first call of a step imports torch.func's machinery
# (torch._dynamo), seconds on a loaded machine, which would otherwise come out of max_time
# before step 1 (seen once in a loop of the slow tests: the run stopped after one step,
# before any timed save).
lf.train_step(loss_fn, opt)(state, next(iter(make_loader())))
ckpt = ModelCheckpoint(os.path.join(out_dir, "ckpt"), train_time_interval=0.3, save_top_k=-1, save_last=False)
out = lf.fit(lf.train_step(loss_fn, opt), state, make_loader(), max_epochs=1000, max_time=6.0, jit=False,
             progress=False, strategy="ddp", callbacks=[slow := SlowRank1(), ckpt])
write(out_dir, rank, {"rank": rank, "step": int(out.step), "saved": sorted(os.path.basename(p) for p in ckpt.best_k_models),
                      "first_step_at": slow.first_step_at})
