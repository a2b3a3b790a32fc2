"""torchrun worker: lf.fit(strategy="fsdp") resumed on another number of ranks.

usage: reshard_fit.py first OUT_DIR   (any world size) an uninterrupted fit of EPOCHS epochs, whose
                                      params rank 0 saves to OUT_DIR/full.safetensors, and a fit
                                      stopped after 2 epochs, its checkpoints in OUT_DIR/part/ckpt
       reshard_fit.py resume OUT_DIR  (another world size) the stopped fit resumed from "last";
                                      writes OUT_DIR/rank<r>.json with its distance to the full run
"""

from __future__ import annotations

import os

import torch

import lightfn as lf
from common import arg, loss_fn, make_data, make_params, max_diff, write
from lightfn.callbacks import Callback, ModelCheckpoint
from lightfn.data import ArrayLoader
from lightfn.optim.alias import adam

EPOCHS = 4
mode, out_dir = arg(1), arg(2)
rank = int(os.environ["RANK"])


class CountSteps(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, ctx):
        self.steps += 1


def run(folder: str, max_epochs: int, resume: bool = False):
    opt = adam(1e-2)
    state = lf.TrainState.create(params=make_params(), optimizer=opt, seed=0)
    train = ArrayLoader(make_data(160, seed=1), batch_size=16, shuffle=True, seed=3)
    ckpt, count = ModelCheckpoint(os.path.join(folder, "ckpt")), CountSteps()
    out = lf.fit(lf.train_step(loss_fn, opt), state, train, max_epochs=max_epochs, callbacks=[ckpt, count], jit=False,
                 progress=False, strategy="fsdp", resume_from="last" if resume else None)
    return out, ckpt, count.steps


if mode == "first":
    full, _, _ = run(os.path.join(out_dir, "full"), EPOCHS)
    if rank == 0:
        lf.save(os.path.join(out_dir, "full.safetensors"), {"params": full.params, "step": full.step})
    run(os.path.join(out_dir, "part"), 2)
else:
    resumed, ckpt, steps_run = run(os.path.join(out_dir, "part"), EPOCHS, resume=True)
    full = lf.load(os.path.join(out_dir, "full.safetensors"))
    write(out_dir, rank, {
        "rank": rank, "world_size": int(os.environ["WORLD_SIZE"]), "step": int(resumed.step), "steps_run": steps_run,
        "full_step": int(full["step"]), "max_diff": max_diff(resumed.params, full["params"]),
        "last_is_sharded_folder": os.path.isdir(ckpt.last_model_path) if ckpt.last_model_path else None,
    })
