"""torchrun worker: a SIGTERM that reaches one rank of a data-parallel fit.

usage: preempt.py OUT_DIR AT_STEP
Rank 1 alone sends itself SIGTERM right after step AT_STEP. fit's per-step vote (a CPU
all-reduce on its gloo control group) makes every rank stop at that same step; the
checkpoint is written once, every rank raises Preempted (SystemExit 0), and a fit resumed
from "last" ends bit-identical to an uninterrupted one. Writes OUT_DIR/rank<r>.json.
"""

from __future__ import annotations

import os
import signal

import lightfn as lf
from common import arg, digest, loss_fn, make_loader, make_params, write
from lightfn.callbacks import Callback, ModelCheckpoint
from lightfn.fit import Preempted
from lightfn.optim.alias import adam

out_dir, at_step = arg(1), int(arg(2))
rank = int(os.environ["RANK"])


class SigtermOnRank1(Callback):
    def on_train_batch_end(self, ctx):
        if rank == 1 and ctx.step == at_step:
            os.kill(os.getpid(), signal.SIGTERM)


def run(folder: str, callbacks=(), resume: bool = False):
    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    return lf.fit(
        lf.train_step(loss_fn, opt), state, make_loader(seed=3), max_epochs=3, jit=False, progress=False,
        strategy="ddp", callbacks=[ModelCheckpoint(os.path.join(folder, "ckpt")), *callbacks],
        resume_from="last" if resume else None,
    )


full = run(os.path.join(out_dir, "full"))
result: dict = {"rank": rank}
folder = os.path.join(out_dir, "preempted")
try:
    run(folder, [SigtermOnRank1()])
    result["preempted"] = None
except Preempted as e:
    result["preempted"] = {"code": e.code, "checkpoint": None if e.checkpoint is None else os.path.basename(e.checkpoint)}
result["saved_step"] = int(lf.load(os.path.join(folder, "ckpt", "last.safetensors"))["loop"]["step"])
resumed = run(folder, resume=True)
result["full"], result["resumed"] = digest(full.params), digest(resumed.params)
write(out_dir, rank, result)
