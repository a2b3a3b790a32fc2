"""torchrun worker: train with data_parallel and/or fully_sharded; report params per rank.

usage: train.py {ddp|fsdp|ddp,fsdp} {eager|compiled} STEPS OUT_DIR
Writes OUT_DIR/rank<r>.json: per strategy, the sha256 of every param leaf (ranks must
agree bit for bit), the max difference to single-process full-batch training, shard sizes
(fsdp) and, compiled, dynamo's graph and graph-break counters.
"""

from __future__ import annotations

import torch

import lightfn as lf
import lightfn.distributed as dist_lf
from common import arg, batches, digest, loss_fn, make_loader, make_params, max_diff, reference, write
from lightfn.optim.alias import adam

strategies, mode, steps, out = arg(1).split(","), arg(2), int(arg(3)), arg(4)
mesh = dist_lf.init(timeout=120)
ref = reference(steps)
result: dict = {"rank": mesh.rank, "world_size": mesh.world_size}
for strategy in strategies:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    step = lf.train_step(loss_fn, opt)
    r: dict = {}
    if strategy == "ddp":
        step = dist_lf.data_parallel(step, mesh)
        state = dist_lf.replicate_state(state, mesh)
    else:
        r["full_bytes"] = dist_lf.shard_bytes(state)
        step = dist_lf.fully_sharded(step, mesh)
        state = dist_lf.shard_state(state, mesh)
        r["shard_bytes"] = dist_lf.shard_bytes(state)
    if mode == "compiled":
        step = lf.jit(step)
    loader = make_loader().shard(mesh.rank, mesh.world_size)
    losses = []
    with dist_lf.guard(mesh, "the train step"):
        for i, b in enumerate(batches(loader, steps)):
            state, metrics = step(state, b)
            if i % 5 == 4:  # log points only
                losses.append(float(dist_lf.reduce_metrics(metrics, mesh)["loss"]))
    params = dist_lf.gather_params(state, mesh) if strategy == "fsdp" else state.params
    r.update(losses=losses, digest=digest(params), max_diff=max_diff(params, ref), step=int(state.step))
    if mode == "compiled":
        c = torch._dynamo.utils.counters
        r["unique_graphs"] = int(c["stats"]["unique_graphs"])
        r["graph_breaks"] = {str(k): int(v) for k, v in c["graph_break"].items()}
    result[strategy] = r
write(out, mesh.rank, result)
