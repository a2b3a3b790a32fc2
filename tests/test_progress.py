"""The progress bar: on by default only on a terminal, off with progress=False, forced on with
progress=True, and what it shows (read back from the stream tqdm writes to)."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

import lightfn as lf
from lightfn.callbacks import Context, ProgressBar
from lightfn.fit import fit

D = 4


class Terminal(io.StringIO):
    """A stdout that says it is a terminal."""

    def isatty(self):
        return True


def loss_fn(p, batch):
    x, y = batch
    err = x @ p["w"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def dataset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, D, generator=g)
    return x, x @ torch.tensor([1.0, -2.0, 3.0, 0.5])


def run(**kw):
    x, y = dataset()
    opt = lf.optim.sgd(0.05)
    state = lf.TrainState.create(params={"w": torch.zeros(D)}, optimizer=opt)
    loader = lf.data.ArrayLoader((x, y), batch_size=8, seed=1)  # 4 batches per epoch
    kw.setdefault("max_epochs", 2)
    return fit(lf.train_step(loss_fn, opt), state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), jit=False,
               log_every_n_steps=1, num_sanity_val_steps=0, **kw)


def final_lines(text):
    """The last rendering of each epoch's bar (tqdm redraws a line with carriage returns)."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.strip()]


def test_no_bar_by_default_when_stdout_is_not_a_terminal(capsys):
    run()
    out = capsys.readouterr()
    assert out.out == "" and "epoch" not in out.err


def test_bar_by_default_on_a_terminal_and_none_with_progress_false(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    run()
    assert re.search(r"epoch 1: 100%.*4/4", term.getvalue())
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    run(progress=False)
    assert term.getvalue() == ""


def test_forced_bar_shows_epoch_step_rate_loss_and_val_metrics(capsys):
    out = run(progress=True)
    lines = final_lines(capsys.readouterr().out)
    assert len(lines) == 2  # one bar per epoch, each left on screen
    for epoch, line in enumerate(lines):
        assert line.startswith(f"epoch {epoch}: 100%") and "4/4" in line
        assert re.search(r"\d+(\.\d+)?it/s", line), line
        assert f"step={4 * (epoch + 1)}" in line
        assert re.search(r"loss=\d\.?\d*", line) and re.search(r"val/loss=\d\.?\d*", line) and "val/mae=" in line
    # the numbers are the logged ones: the last val/loss equals an evaluation of the final params
    shown = float(re.search(r"val/loss=([0-9.e+-]+)", lines[-1]).group(1))
    assert shown == pytest.approx(loss_fn(out.params, dataset())[0].item(), rel=1e-3)  # shown with 4 digits


def test_a_given_bar_is_used_instead_of_a_default_one():
    stream = io.StringIO()
    run(progress=True, callbacks=[ProgressBar(total=4, file=stream)])
    lines = final_lines(stream.getvalue())
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1"]


def test_nothing_is_drawn_on_other_ranks(monkeypatch, capsys):
    # fit asks lightfn.distributed.mesh.is_main() (through its Spread) which process logs;
    # pretend this one is rank 1
    monkeypatch.setattr(sys.modules["lightfn.distributed.strategy"], "is_main", lambda: False)
    stream = io.StringIO()
    run(progress=True, callbacks=[ProgressBar(total=4, file=stream)])
    assert stream.getvalue() == "" and capsys.readouterr().out == ""
    # the callback itself, driven directly
    bar = ProgressBar(total=2, file=stream)
    for hook, step in [(bar.on_fit_start, 0), (bar.on_train_batch_end, 1), (bar.on_train_batch_end, 2),
                       (bar.on_epoch_end, 2), (bar.on_fit_end, 2)]:
        hook(Context(state=None, step=step, epoch=0, batch_idx=step, metrics={"train/loss": 1.0}, is_main=False))
    assert stream.getvalue() == ""
