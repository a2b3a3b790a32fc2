"""Progress output: a live bar on a terminal (forced with progress=True), plain lines (one per
epoch, and around the first compiled step) when stdout is not a terminal, nothing with
progress=False; what each shows (read back from the stream it writes to)."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch

import lightfn as lf
from lightfn.callbacks import Callback, Context, ProgressBar, ProgressLog
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
    kw.setdefault("summary", False)  # tested in test_summary.py
    kw.setdefault("jit", False)
    return fit(lf.train_step(loss_fn, opt), state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn),
               log_every_n_steps=1, num_sanity_val_steps=0, **kw)


def final_lines(text):
    """The last rendering of each epoch's bar (tqdm redraws a line with carriage returns)."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.strip()]


class Record(Callback):
    """What the loop logged at each epoch's end."""

    def __init__(self):
        self.seen = []

    def on_epoch_end(self, ctx):
        self.seen.append((ctx.step, dict(ctx.metrics)))


def expected_lines(record, max_epochs="2"):
    out = []
    for epoch, (step, m) in enumerate(record.seen):
        names = ["train/loss_epoch", "train/mae_epoch", "val/loss", "val/mae"]
        values = "  ".join(f"{k}={m[k]:.4g}" for k in names)
        out.append(f"epoch {epoch + 1}{'/' + max_epochs if max_epochs else ''}  step {step}  {values}  ")
    return out


def split_elapsed(line):
    """(the line without its trailing seconds, the seconds): elapsed time is never compared."""
    match = re.fullmatch(r"(.*  )(\d+\.\d)s", line)
    assert match, line
    return match.group(1), float(match.group(2))


def test_plain_lines_by_default_when_stdout_is_not_a_terminal(capsys):
    record = Record()
    out = run(callbacks=[record])
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert "\r" not in captured.out and "epoch" not in captured.err  # no live bar
    assert [split_elapsed(line)[0] for line in lines] == expected_lines(record)
    assert [step for step, _ in record.seen] == [4, 8]
    # the numbers shown are the logged ones: the last val/loss is an evaluation of the final params
    shown = float(re.search(r"val/loss=([0-9.e+-]+)", lines[-1]).group(1))
    assert shown == pytest.approx(loss_fn(out.params, dataset())[0].item(), rel=1e-3)
    assert "compil" not in captured.out  # an eager run is never said to compile


def test_plain_lines_without_max_epochs_and_with_a_step_limit(capsys):
    record = Record()
    run(callbacks=[record], max_epochs=None, max_steps=6)  # two epochs: 4 steps, then 2
    lines = capsys.readouterr().out.splitlines()
    assert [split_elapsed(line)[0] for line in lines] == expected_lines(record, max_epochs=None)
    assert [step for step, _ in record.seen] == [4, 6]


def test_progress_false_prints_nothing(capsys):
    run(progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_a_jit_step_that_does_not_compile_is_not_said_to_compile(capsys):
    x, y = dataset()
    opt = lf.optim.sgd(0.05)
    state = lf.TrainState.create(params={"w": torch.zeros(D)}, optimizer=opt)
    step = lf.jit(lf.train_step(loss_fn, opt), donate=True, disable=True)
    fit(step, state, [(x, y)], max_epochs=1, jit=True, summary=False)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1  step 1  train/loss_epoch=")


@pytest.mark.compile
def test_the_first_compiled_step_is_announced_with_its_duration(capsys):
    record = Record()
    out = run(callbacks=[record], jit="sync", max_epochs=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "compiling the train step (its first call)..."
    assert re.fullmatch(r"train step compiled in \d+\.\d s", lines[1]), lines[1]
    assert [split_elapsed(line)[0] for line in lines[2:]] == expected_lines(record)
    assert float(re.search(r"val/loss=([0-9.e+-]+)", lines[-1]).group(1)) == pytest.approx(
        loss_fn(out.params, dataset())[0].item(), rel=1e-3)


def test_a_given_progress_log_is_used_and_silent_on_other_ranks(monkeypatch, capsys):
    stream, record = io.StringIO(), Record()
    run(callbacks=[ProgressLog(max_epochs=9, file=stream), record])
    assert capsys.readouterr().out == ""  # no second display added
    assert [split_elapsed(line)[0] for line in stream.getvalue().splitlines()] == expected_lines(record, "9")
    monkeypatch.setattr(sys.modules["lightfn.fit._processes"], "is_main", lambda: False)
    stream = io.StringIO()
    run(callbacks=[ProgressLog(file=stream)])
    assert stream.getvalue() == "" and capsys.readouterr().out == ""


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
    # fit asks lightfn.distributed.mesh.is_main() (through its Processes) which process logs;
    # pretend this one is rank 1
    monkeypatch.setattr(sys.modules["lightfn.fit._processes"], "is_main", lambda: False)
    stream = io.StringIO()
    run(progress=True, callbacks=[ProgressBar(total=4, file=stream)])
    assert stream.getvalue() == "" and capsys.readouterr().out == ""
    # the callback itself, driven directly
    bar = ProgressBar(total=2, file=stream)
    for hook, step in [(bar.on_fit_start, 0), (bar.on_train_batch_end, 1), (bar.on_train_batch_end, 2),
                       (bar.on_epoch_end, 2), (bar.on_fit_end, 2)]:
        hook(Context(state=None, step=step, epoch=0, batch_idx=step, metrics={"train/loss": 1.0}, is_main=False))
    assert stream.getvalue() == ""
