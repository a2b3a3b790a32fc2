"""torchrun worker that ends a run the way a user's script does: by simply returning.

usage: exit.py collective       init, one all_reduce, exit (no teardown lines: lightfn's at-exit shutdown)
       exit.py ckpt DIR         init, save a fully sharded state to DIR/sharded, exit
"""

from __future__ import annotations

import os

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, loss_fn, make_params
from lightfn.optim.alias import adam

mesh = dist_lf.init(timeout=60)
if arg(1) == "collective":
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    assert float(t) == mesh.world_size
else:
    opt = adam(1e-2)
    state = dist_lf.shard_state(lf.TrainState.create(params=make_params(), optimizer=opt, seed=0), mesh)
    dist_lf.save_sharded(os.path.join(arg(2), "sharded"), state, mesh)
