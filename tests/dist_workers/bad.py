"""Worker for failure cases; rank 0 (or every rank) writes what it caught.

usage: bad.py mismatch OUT     rank 1 builds a different model: replicate_state must name the path
       bad.py exit OUT         rank 1 dies right after init: rank 0's next collective must fail clearly
       bad.py stall OUT        rank 1 stalls past the 3 s timeout: same
       bad.py fit_exit OUT     rank 1 dies at step 3 of a data-parallel fit: rank 0's fit must fail clearly
"""

from __future__ import annotations

import os
import time

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, loss_fn, make_loader, make_params, write
from lightfn.callbacks import Callback
from lightfn.distributed.strategy import Strategy
from lightfn.optim.alias import adam

mode, out = arg(1), arg(2)
mesh = dist_lf.init(timeout=3 if mode != "mismatch" else 60)
caught = None
if mode == "mismatch":
    params = make_params()
    if mesh.rank == 1:
        params["dec"]["w"] = torch.zeros(13, 4)
    state = lf.TrainState.create(params=params, optimizer=adam(1e-2), seed=0)
    try:
        dist_lf.replicate_state(state, mesh)
    except lf.DistributedError as e:
        caught = str(e)
    write(out, mesh.rank, {"error": caught})
elif mode == "fit_exit":

    class DieAtStep3(Callback):
        def on_train_batch_end(self, ctx):
            if mesh.rank == 1 and ctx.step == 3:
                os._exit(0)

    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    t0 = time.monotonic()
    try:
        lf.fit(lf.train_step(loss_fn, opt), state, make_loader(), max_epochs=3, jit=False, progress=False,
               strategy=Strategy(name="ddp", timeout=3), callbacks=[DieAtStep3()])
    except lf.DistributedError as e:
        caught = str(e)
    write(out, mesh.rank, {"error": caught, "seconds": time.monotonic() - t0})
    os._exit(0)
else:
    if mesh.rank == 1:
        if mode == "stall":
            time.sleep(6)
        os._exit(0)
    t0 = time.monotonic()
    try:
        dist_lf.barrier(mesh)
        dist_lf.barrier(mesh)
    except lf.DistributedError as e:
        caught = str(e)
    write(out, mesh.rank, {"error": caught, "seconds": time.monotonic() - t0})
    os._exit(0)
