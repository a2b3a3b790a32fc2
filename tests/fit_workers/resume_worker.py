"""Small fit runs that tests/test_resume.py interrupts on purpose: SIGKILL or SIGTERM.

    python resume_worker.py BASE NAME=WHEN [NAME=WHEN ...] [--jit sync|background]

Imports torch once, then forks one child per ``NAME=WHEN`` (before any tensor work, so the
children share no thread pool); each child runs the same fit with its checkpoints in
``BASE/NAME`` and is interrupted at WHEN:

- ``step:K``: SIGKILL right after step K ran, before fit saves anything of step K;
- ``epoch_end:E``: SIGKILL in the end hook of epoch E (after its validation, before its
  checkpoint);
- ``sigterm:K``: a SIGTERM right after step K ran (the process sends it to itself, so the
  point is exact): fit writes ``last.safetensors`` and exits with status 0.

The parent prints one line ``NAME STATUS`` per child (``-9``: killed by SIGKILL). The test
imports :func:`make_run` and :func:`make_callbacks` to run the uninterrupted reference and
the resumed runs in its own process. Not collected by pytest (no ``test_`` prefix).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401 - torch.func imports it on first use: import it once, before forking

import lightfn as lf
from lightfn.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightfn.data import ArrayLoader
from lightfn.fit import fit

N, D, H, BATCH = 44, 6, 16, 8  # 6 batches per epoch, the last one ragged (4 rows)
EVERY_N_STEPS = 3  # odd: some checkpoints fall between the 2 micro-batches of an accumulation


def loss_fn(params, batch, train=True):
    x, y = batch
    h = torch.tanh(x @ params["w1"] + params["b1"])
    h = torch.nn.functional.dropout(h, 0.3, training=train)  # drawn from the state's RNG
    err = (h @ params["w2"] + params["b2"]).squeeze(-1) - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def make_run(jit: bool | str = False) -> dict:
    """The step, state, data and fit arguments every process of a test uses."""
    g = torch.Generator().manual_seed(0)
    x, vx = torch.randn(N, D, generator=g), torch.randn(16, D, generator=g)
    y, vy = torch.sin(x).sum(1), torch.sin(vx).sum(1)
    params = {
        "w1": torch.randn(D, H, generator=g) * 0.3,
        "b1": torch.zeros(H),
        "w2": torch.randn(H, 1, generator=g) * 0.3,
        "b2": torch.zeros(1),
    }
    opt = lf.optim.adam(0.02)
    kw: dict = dict(max_epochs=4, jit=jit, progress=False, log_every_n_steps=2)
    if jit:  # one small compiled graph: equal batches, no validation, plain Adam
        train = ArrayLoader((x, y), batch_size=BATCH, shuffle=True, drop_last=True, seed=11)
    else:
        kw.update(accumulate_grad_batches=2, gradient_clip_val=1.0)
        train = ArrayLoader((x, y), batch_size=BATCH, shuffle=True, drop_last=False, seed=11)
        val = ArrayLoader((vx, vy), batch_size=BATCH, shuffle=False, drop_last=False)
        kw.update(val_data=val, eval_step=lf.eval_step(functools.partial(loss_fn, train=False)))
    return dict(step=lf.train_step(loss_fn, opt), state=lf.TrainState.create(params=params, optimizer=opt, seed=3),
                train_data=train, **kw)


def make_callbacks(dirpath: Path, jit: bool | str = False) -> list[Callback]:
    """A step-schedule checkpoint (the ``last`` to resume from), a top-2 by ``val/loss`` and
    an EarlyStopping whose ``min_delta`` nothing beats: it stops after exactly ``patience``
    more validations than the first, a count a resumed run must carry over."""
    cbs: list[Callback] = [ModelCheckpoint(dirpath, every_n_steps=EVERY_N_STEPS, save_top_k=1)]
    if not jit:
        cbs += [ModelCheckpoint(dirpath, monitor="val/loss", save_top_k=2),
                EarlyStopping(monitor="val/loss", patience=2, min_delta=1e9)]
    return cbs


class Interrupt(Callback):
    """Send ``sig`` to this process after step ``at_step`` or in epoch ``at_epoch_end``'s end
    hook: before fit acts on the hook's signals (so nothing of that point is saved)."""

    def __init__(self, sig: int, at_step: int | None = None, at_epoch_end: int | None = None) -> None:
        self.sig, self.at_step, self.at_epoch_end = sig, at_step, at_epoch_end

    def on_train_batch_end(self, ctx):
        if ctx.step == self.at_step:
            os.kill(os.getpid(), self.sig)

    def on_epoch_end(self, ctx):
        if ctx.epoch == self.at_epoch_end:
            os.kill(os.getpid(), self.sig)


def interrupt(when: str) -> Interrupt:
    kind, value = when.split(":")
    if kind == "step":
        return Interrupt(signal.SIGKILL, at_step=int(value))
    if kind == "epoch_end":
        return Interrupt(signal.SIGKILL, at_epoch_end=int(value))
    if kind == "sigterm":
        return Interrupt(signal.SIGTERM, at_step=int(value))
    raise SystemExit(f"unknown interruption {when!r}")


def child(dirpath: Path, when: str, jit: bool | str) -> int:
    """Run one interrupted fit; the exit status a SIGTERM leads to (a SIGKILL never returns)."""
    try:
        fit(callbacks=make_callbacks(dirpath, jit=jit) + [interrupt(when)], **make_run(jit=jit))
    except SystemExit as e:  # lf.fit.Preempted after a SIGTERM: SystemExit(0)
        return int(e.code or 0)
    print(f"{dirpath.name}: finished without being interrupted", file=sys.stderr, flush=True)
    return 3


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("base", type=Path)
    ap.add_argument("runs", nargs="+", help="NAME=WHEN")
    ap.add_argument("--jit", choices=("sync", "background"), default=False)
    args = ap.parse_args(argv)
    children = {}
    for run in args.runs:
        name, when = run.split("=")
        pid = os.fork()
        if pid == 0:  # the child never returns into this loop
            code = 4
            try:
                code = child(args.base / name, when, args.jit)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = name
    for pid, name in children.items():
        _, status = os.waitpid(pid, 0)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(f"{name} {code}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
