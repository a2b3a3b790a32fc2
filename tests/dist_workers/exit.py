"""torchrun worker that ends a run the way a user's script does: by simply returning.

usage: exit.py collective       init, one all_reduce, exit (no teardown lines: lightfn's at-exit shutdown)
       exit.py ckpt DIR         init, save a fully sharded state to DIR/sharded, exit
       exit.py threads          one data-parallel train step (torch.func, so dynamo is imported),
                                lf.distributed.shutdown(), then no gloo thread may be left
"""

from __future__ import annotations

import os

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, loss_fn, make_data, make_params
from lightfn.optim.alias import adam

mesh = dist_lf.init(timeout=60)
if arg(1) == "collective":
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    assert float(t) == mesh.world_size
elif arg(1) == "threads":
    opt = adam(1e-2)
    state = dist_lf.replicate_state(lf.TrainState.create(params=make_params(), optimizer=opt, seed=0), mesh)
    step = dist_lf.data_parallel(lf.train_step(loss_fn, opt), mesh)
    x, y = make_data(16)
    state, _ = step(state, (x, y))
    assert dist_lf.shutdown() is True
    # A gloo group joins its threads only when the last reference to it goes: any thread
    # left here would be torn down by interpreter exit, which is the abort this guards.
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    left = sorted(n for n in names if "gloo" in n)
    assert left == [], f"gloo threads alive after shutdown: {left}"
else:
    opt = adam(1e-2)
    state = dist_lf.shard_state(lf.TrainState.create(params=make_params(), optimizer=opt, seed=0), mesh)
    dist_lf.save_sharded(os.path.join(arg(2), "sharded"), state, mesh)
