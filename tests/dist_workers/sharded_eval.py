"""torchrun worker: fully_sharded_eval on a sharded state against eval_step on the full params.

usage: sharded_eval.py OUT_DIR
Writes OUT_DIR/rank<r>.json: the single-process metrics of lf.eval_step on the full params
and global batch, the fully sharded eval's metrics on that same batch (every rank), the
reduce_metrics mean of its metrics on this rank's rows (shard_batch), and a host-side
sum_over_ranks of per-rank accumulators (an int64 count and a float sum).
"""

from __future__ import annotations

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from lightfn.distributed.collectives import sum_over_ranks
from common import GLOBAL_BATCH, arg, loss_fn, make_data, make_params, write
from lightfn.optim.alias import adam

out = arg(1)
mesh = dist_lf.init(timeout=120)
state = lf.TrainState.create(params=make_params(), optimizer=adam(1e-2), seed=0)
x, y = make_data()
batch = (x[:GLOBAL_BATCH], y[:GLOBAL_BATCH])
evaluate = lf.eval_step(loss_fn)
reference = evaluate(state, batch)  # one process, full params, whole batch

sharded = dist_lf.shard_state(state, mesh)
sharded_eval = dist_lf.fully_sharded_eval(evaluate, mesh)
with dist_lf.guard(mesh, "the eval step"):
    whole = sharded_eval(sharded, batch)
    rows = dist_lf.reduce_metrics(sharded_eval(sharded, dist_lf.shard_batch(batch, mesh)), mesh)
summed = sum_over_ranks({"n": torch.tensor(mesh.rank + 1), "x": torch.tensor([0.5, mesh.rank + 1.0])}, mesh)
write(out, mesh.rank, {
    "rank": mesh.rank,
    "shard": int(sharded.params.shard.numel()),
    "reference": {k: float(v) for k, v in reference.items()},
    "whole": {k: float(v) for k, v in whole.items()},
    "rows": {k: float(v) for k, v in rows.items()},
    "summed": {"n": int(summed["n"]), "n_dtype": str(summed["n"].dtype), "x": summed["x"].tolist()},
})
