"""torchrun worker: lf.fit(strategy=...) with validation, ModelCheckpoint, EarlyStopping, a
CSV logger, and resume_from="last"; compared with a single-process fit on the full batches.

usage: fit_worker.py STRATEGIES OUT_DIR      STRATEGIES: comma-separated, e.g. ddp,fsdp,fsdp-gathered
Before joining the process group, rank 0 runs the reference fit (no strategy). Then for
each strategy every rank runs (a) an uninterrupted fit in OUT_DIR/<strategy>/full and (b) a
fit stopped after 2 epochs then resumed with resume_from="last" in OUT_DIR/<strategy>/resumed.
Writes OUT_DIR/rank<r>.json: per strategy, params digests (ranks must agree bit for bit),
the max difference to the reference, the best checkpoint score and the epoch fit stopped at.
"""

from __future__ import annotations

import os

import torch

import lightfn as lf
from common import arg, digest, loss_fn, make_data, make_params, max_diff, write
from lightfn.callbacks import EarlyStopping, ModelCheckpoint
from lightfn.data import ArrayLoader
from lightfn.distributed.strategy import Strategy
from lightfn.fit._processes import Processes, control_group
from lightfn.loggers import CSVLogger
from lightfn.optim.alias import adam

MAX_EPOCHS = 8


def summing_loss(params, batch):
    """loss_fn plus summed states: over ranks their totals must be the whole data's."""
    loss, metrics = loss_fn(params, batch)
    x, y = batch
    sse = ((torch.tanh(x @ params["enc"]["w"] + params["enc"]["b"]) @ params["dec"]["w"] + params["dec"]["b"] - y) ** 2).sum()
    return loss, {**metrics, "se": lf.metrics.Sum({"sse": sse, "rows": torch.tensor(y.shape[0])})}


def rmse(totals):
    return {"rmse": torch.sqrt(totals["se"]["sse"] / totals["se"]["rows"]), "rows": totals["se"]["rows"]}


def run(strategy, folder: str, *, max_epochs: int = MAX_EPOCHS, resume: bool = False) -> dict:
    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    train = ArrayLoader(make_data(160, seed=1), batch_size=16, shuffle=True, seed=3)
    val = ArrayLoader(make_data(48, seed=2), batch_size=16, shuffle=False)
    ckpt = ModelCheckpoint(os.path.join(folder, "ckpt"), monitor="val/loss", save_top_k=2)
    stop = EarlyStopping(monitor="val/loss", patience=1, min_delta=0.02)
    out = lf.fit(
        lf.train_step(summing_loss, opt), state, train, val_data=val, eval_step=lf.eval_step(summing_loss),
        compute_metrics=rmse, max_epochs=max_epochs, callbacks=[ckpt, stop], loggers=[CSVLogger(os.path.join(folder, "logs"))],
        log_every_n_steps=4, jit=False, progress=False, strategy=strategy,
        resume_from="last" if resume else None,
    )
    return {"params": out.params, "best": ckpt.best_model_score, "stopped_epoch": stop.stopped_epoch,
            "step": int(out.step)}


def strategy_of(name: str):
    return Strategy(name="fsdp", gather_checkpoints=True) if name == "fsdp-gathered" else name


names, out_dir = arg(1).split(","), arg(2)
rank = int(os.environ["RANK"])
result: dict = {"rank": rank}
if rank == 0:  # before any process group exists: a plain single-process fit
    ref = run(None, os.path.join(out_dir, "reference"))
    result["reference"] = {"best": ref["best"], "stopped_epoch": ref["stopped_epoch"], "step": ref["step"]}
for name in names:
    folder = os.path.join(out_dir, name)
    full = run(strategy_of(name), os.path.join(folder, "full"))
    run(strategy_of(name), os.path.join(folder, "resumed"), max_epochs=2)
    resumed = run(strategy_of(name), os.path.join(folder, "resumed"), resume=True)
    r = {
        "digest": digest(full["params"]),
        "resumed_digest": digest(resumed["params"]),
        "resumed_diff": max_diff(resumed["params"], full["params"]),
        "best": full["best"],
        "stopped_epoch": full["stopped_epoch"],
        "step": full["step"],
        "resumed_step": resumed["step"],
    }
    if rank == 0:
        r["max_diff"] = max_diff(full["params"], ref["params"])
    result[name] = r
# fit's per-step vote (stop, preemption, one shared clock): a CPU all-reduce on a gloo control group
mesh = lf.distributed.init()
spread = Processes(mesh=mesh, strategy=Strategy(name="ddp"), step=None, state=None, eval_step=None, control=control_group(mesh))
with spread.guard():
    cpu = torch.device("cpu")
    result["agree"] = [spread.vote((rank == 1, False), 1.0 + rank, cpu), spread.vote((False, False), 5.0 - rank, cpu)]
    result["control"] = [torch.distributed.get_backend(spread.control), torch.distributed.get_world_size(spread.control)]
write(out_dir, rank, result)
