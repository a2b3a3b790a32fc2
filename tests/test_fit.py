import csv
import math
import signal

import pytest
import torch

import lightfn as lf
from lightfn.callbacks import Callback, ModelCheckpoint, Signal
from lightfn.errors import StepError
from lightfn.fit import FitError, fit
from lightfn.loggers import CSVLogger, TensorBoardLogger
from memory_logger import MemoryLogger

N, D = 40, 4


def problem(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1
    params = {"w": torch.zeros(D), "b": torch.zeros(())}
    return x, y, params


def loss_fn(p, batch):
    x, y = batch
    err = x @ p["w"] + p["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def setup(opt=None, n=N, batch_size=8, **loader_kw):
    x, y, params = problem(n)
    opt = opt or lf.optim.sgd(0.05)
    state = lf.TrainState.create(params=params, optimizer=opt)
    loader = lf.data.ArrayLoader((x, y), batch_size=batch_size, **loader_kw)
    return lf.train_step(loss_fn, opt), state, loader


class Recorder(Callback):
    """Counts hooks and keeps the metrics each one saw."""

    def __init__(self):
        self.events = []
        self.metrics = []

    def _rec(self, name, ctx):
        self.events.append((name, ctx.stage, ctx.epoch, ctx.step, ctx.batch_idx))
        self.metrics.append(dict(ctx.metrics))

    def on_fit_start(self, ctx):
        self._rec("fit_start", ctx)

    def on_train_batch_end(self, ctx):
        self._rec("batch", ctx)

    def on_validation_end(self, ctx):
        self._rec("val", ctx)

    def on_epoch_end(self, ctx):
        self._rec("epoch", ctx)

    def on_fit_end(self, ctx):
        self._rec("fit_end", ctx)

    def count(self, name, stage=None):
        return sum(1 for e in self.events if e[0] == name and (stage is None or e[1] == stage))

    def steps_of(self, name, stage=None):
        return [e[3] for e in self.events if e[0] == name and (stage is None or e[1] == stage)]


def run(step, state, loader, **kw):
    kw.setdefault("jit", False)
    kw.setdefault("progress", False)
    return fit(step, state, loader, **kw)


# ----------------------------------------------------------------------------- counting flags


def test_max_epochs_counts_steps_epochs_and_validations():
    step, state, loader = setup()
    rec = Recorder()
    out = run(step, state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), max_epochs=3, callbacks=[rec])
    assert int(out.step) == 15
    assert rec.count("batch") == 15 and rec.count("epoch") == 3
    assert rec.count("val", "validate") == 3 and rec.count("val", "sanity") == 1
    assert rec.steps_of("val", "validate") == [5, 10, 15]
    assert [e[0] for e in rec.events[:2]] == ["fit_start", "val"] and rec.events[-1][0] == "fit_end"
    # hook order within an epoch: batches, then validation, then epoch end
    assert [e[0] for e in rec.events[6:9]] == ["batch", "val", "epoch"]
    assert int(state.step) == 0 and torch.count_nonzero(state.params["w"]) == 0  # caller's state untouched


def test_max_epochs_default_is_1000_like_lightning():
    step, state, loader = setup(n=8, batch_size=8)
    out = run(step, state, loader)
    assert int(out.step) == 1000


def test_max_steps_stops_mid_epoch_and_still_closes_the_epoch():
    step, state, loader = setup()
    rec = Recorder()
    out = run(step, state, loader, max_steps=7, callbacks=[rec])
    assert int(out.step) == 7
    assert rec.count("batch") == 7 and rec.count("epoch") == 2
    assert rec.steps_of("epoch") == [5, 7]


def test_limit_train_and_val_batches_int_and_fraction():
    step, state, loader = setup()
    calls = []

    def eval_fn(s, batch):
        calls.append(batch[0].shape[0])
        return {"loss": loss_fn(s.params, batch)[0]}

    rec = Recorder()
    out = run(step, state, loader, val_data=loader, eval_step=eval_fn, max_epochs=2, limit_train_batches=2,
              limit_val_batches=0.6, num_sanity_val_steps=1, callbacks=[rec])
    assert int(out.step) == 4
    assert rec.steps_of("epoch") == [2, 4]
    # sanity: 1 batch; each validation: int(5 * 0.6) = 3 batches
    assert len(calls) == 1 + 2 * 3


def test_val_check_interval_int_float_and_across_epochs():
    step, state, loader = setup()
    ev = lf.eval_step(loss_fn)
    for interval, every, expected in [(2, 1, [2, 4, 7, 9]), (0.4, 1, [2, 4, 7, 9]), (3, None, [3, 6, 9])]:
        rec = Recorder()
        run(step, state, loader, val_data=loader, eval_step=ev, max_epochs=2, val_check_interval=interval,
            check_val_every_n_epoch=every, num_sanity_val_steps=0, callbacks=[rec])
        assert rec.steps_of("val", "validate") == expected, (interval, every)


def test_check_val_every_n_epoch():
    step, state, loader = setup()
    rec = Recorder()
    run(step, state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), max_epochs=5,
        check_val_every_n_epoch=2, num_sanity_val_steps=0, callbacks=[rec])
    assert rec.steps_of("val", "validate") == [10, 20]
    assert rec.count("epoch") == 5


def test_fast_dev_run_runs_one_batch_each_and_writes_nothing(tmp_path):
    step, state, loader = setup()
    rec = Recorder()
    val_calls = []

    def eval_fn(s, batch):
        val_calls.append(1)
        return {"loss": loss_fn(s.params, batch)[0]}

    out = fit(step, state, loader, val_data=loader, eval_step=eval_fn, max_epochs=10, jit=False, fast_dev_run=True,
              callbacks=[rec, ModelCheckpoint(tmp_path / "ckpt", every_n_steps=1)],
              loggers=[CSVLogger(tmp_path / "logs")], progress=True)
    assert int(out.step) == 1 and rec.count("batch") == 1 and rec.count("epoch") == 1
    assert len(val_calls) == 1  # no sanity run, one validation batch
    assert list(tmp_path.iterdir()) == []

    out = run(step, state, loader, fast_dev_run=3)
    assert int(out.step) == 3


def test_overfit_batches_reuses_the_same_first_batches_for_train_and_val():
    x, y, params = problem()
    opt = lf.optim.sgd(0.01)
    seen, val_seen = [], []

    def step(s, batch):
        seen.append(batch[0][:, 0].clone())
        return lf.train_step(loss_fn, opt)(s, batch)

    def eval_fn(s, batch):
        val_seen.append(batch[0][:, 0].clone())
        return {"loss": loss_fn(s.params, batch)[0]}

    loader = lf.data.ArrayLoader((x, y), batch_size=8, shuffle=True, seed=3)
    state = lf.TrainState.create(params=params, optimizer=opt)
    out = run(step, state, loader, val_data=loader, eval_step=eval_fn, max_epochs=3, overfit_batches=2,
              num_sanity_val_steps=0)
    assert int(out.step) == 6
    first = list(loader.iter_epoch(0))[:2]
    for e in range(3):
        for i in range(2):
            assert torch.equal(seen[2 * e + i], first[i][0][:, 0])
    assert len(val_seen) == 6 and all(torch.equal(v, first[i % 2][0][:, 0]) for i, v in enumerate(val_seen))
    out = run(step, state, loader, max_epochs=1, overfit_batches=0.4)
    assert int(out.step) == 2


class StopAtEpochEnd(Callback):
    def on_epoch_end(self, ctx):
        return Signal(stop=True, reason="test stop")


class StopAtStep(Callback):
    def __init__(self, n):
        self.n = n

    def on_train_batch_end(self, ctx):
        if ctx.step >= self.n:
            return Signal(stop=True, reason="test")


def test_stop_signal_and_min_epochs_min_steps_defer_it():
    step, state, loader = setup()
    assert int(run(step, state, loader, max_epochs=10, callbacks=[StopAtEpochEnd()]).step) == 5
    assert int(run(step, state, loader, max_epochs=10, min_epochs=3, callbacks=[StopAtEpochEnd()]).step) == 15
    rec = Recorder()
    out = run(step, state, loader, max_epochs=10, callbacks=[StopAtStep(2), rec])
    assert int(out.step) == 2 and rec.count("epoch") == 1  # a mid-epoch stop still ends the epoch
    assert int(run(step, state, loader, max_epochs=10, min_steps=8, callbacks=[StopAtStep(2)]).step) == 8


def test_max_time_stops_and_accepts_lightning_formats():
    step, state, loader = setup()
    assert int(run(step, state, loader, max_epochs=5, max_time=0).step) == 0
    import time

    def slow(s, b):
        time.sleep(1.0)
        return step(s, b)

    assert int(run(slow, state, loader, max_epochs=5, max_time=0.5).step) == 1  # checked after each step
    assert int(run(step, state, loader, max_epochs=2, max_time="00:01:00:00").step) == 10
    with pytest.raises(FitError, match="max_time"):
        run(step, state, loader, max_time="soon")


# ----------------------------------------------------------------------------- metrics and logging


def test_epoch_means_are_weighted_by_batch_size_over_a_ragged_last_batch():
    x = torch.arange(10.0).unsqueeze(1)
    loader = lf.data.ArrayLoader(x, batch_size=4, shuffle=False, drop_last=False)  # 4, 4, 2

    def step(s, batch):
        return {"n": s["n"] + 1}, {"mean_x": batch.mean(), "first": batch[0, 0]}

    def eval_fn(s, batch):
        return {"mean_x": batch.mean()}

    logger = MemoryLogger()
    run(step, {"n": torch.zeros((), dtype=torch.int64)}, loader, val_data=loader, eval_step=eval_fn, max_epochs=1,
        loggers=[logger], log_every_n_steps=1)
    assert logger.values("train/mean_x_epoch") == [(3, pytest.approx(4.5))]  # not (1.5 + 5.5 + 8.5) / 3
    assert logger.values("val/mean_x") == [(3, pytest.approx(4.5))]
    assert logger.values("train/mean_x") == [(1, 1.5), (2, 5.5), (3, 8.5)]
    assert logger.values("train/first_epoch") == [(3, pytest.approx((0 * 4 + 4 * 4 + 8 * 2) / 10))]


def test_log_every_n_steps_lr_epoch_and_hparams():
    step, state, loader = setup(opt=lf.optim.adam(0.01))
    logger = MemoryLogger()
    run(step, state, loader, max_epochs=2, loggers=[logger], log_every_n_steps=3, hparams={"lr": 0.01, "bs": 8})
    assert logger.hparams == {"lr": 0.01, "bs": 8}
    assert [s for s, _ in logger.values("train/loss")] == [3, 6, 9]
    assert [v for _, v in logger.values("lr")] == pytest.approx([0.01] * 3)
    assert logger.values("epoch") == [(3, 0), (5, 0), (6, 1), (9, 1), (10, 1)]
    assert [s for s, _ in logger.values("train/mae_epoch")] == [5, 10]


def test_hparams_are_stored_in_every_checkpoint_and_checked_before_training(tmp_path):
    step, state, loader = setup()
    hparams = {"lr": 0.05, "layers": (4, 1), "name": "linear", "nested": {"wd": None}}
    run(step, state, loader, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path, save_top_k=-1)], hparams=hparams)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == ["epoch=0-step=5.safetensors", "epoch=1-step=10.safetensors", "last.safetensors"]
    for name in files:  # as JSON gives them back: the tuple is a list
        assert lf.read_metadata(tmp_path / name)["hparams"] == {"lr": 0.05, "layers": [4, 1], "name": "linear", "nested": {"wd": None}}
    resumed = run(step, state, loader, max_epochs=3, resume_from=tmp_path / "last.safetensors", hparams={"lr": 0.05},
                  callbacks=[ModelCheckpoint(tmp_path / "more")])
    assert int(resumed.step) == 15 and lf.read_metadata(tmp_path / "more" / "last.safetensors")["hparams"] == {"lr": 0.05}
    logger = MemoryLogger()
    with pytest.raises(FitError, match=r"hparams must be JSON-serializable .*device"):
        run(step, state, loader, max_epochs=1, loggers=[logger], hparams={"device": torch.device("cpu")})
    assert logger.rows == [] and logger.hparams is None  # refused before anything ran
    with pytest.raises(FitError, match="hparams must be a dict"):
        run(step, state, loader, max_epochs=1, hparams=[("lr", 0.1)])


def test_lr_is_logged_once_by_fit_or_by_a_learning_rate_monitor():
    step, state, loader = setup(opt=lf.optim.adam(lf.optim.linear_schedule(0.01, 0.0, 10)))
    own, monitored = MemoryLogger(), MemoryLogger()
    run(step, state, loader, max_epochs=2, loggers=[own], log_every_n_steps=2)
    run(step, state, loader, max_epochs=2, loggers=[monitored], log_every_n_steps=2,
        callbacks=[lf.callbacks.LearningRateMonitor(log_every_n_steps=2)])
    # the rate each logged step's update used: 0.01 * (1 - (step - 1) / 10)
    expected = [(s, pytest.approx(0.01 * (1 - (s - 1) / 10))) for s in (2, 4, 6, 8, 10)]
    assert own.values("lr") == expected
    assert monitored.values("lr") == expected  # the monitor's, and fit's own is not added
    assert sum(1 for _, m in monitored.rows if "lr" in m) == 5


def test_logged_files_read_back_with_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    step, state, loader = setup(opt=lf.optim.adam(0.01))
    val_x, val_y, _ = problem(16, seed=1)
    val = lf.data.ArrayLoader((val_x, val_y), batch_size=16, shuffle=False)
    ev = lf.eval_step(loss_fn)
    mem = MemoryLogger()
    csv_logger, tb = CSVLogger(tmp_path), TensorBoardLogger(tmp_path)
    out = run(step, state, loader, val_data=val, eval_step=ev, max_epochs=2, log_every_n_steps=2,
              loggers=[csv_logger, tb, mem], hparams={"lr": 0.01})
    tb.close()
    # the last validation equals an independent evaluation of the final params
    final_val = loss_fn(out.params, (val_x, val_y))[0].item()
    assert mem.values("val/loss")[-1] == (10, pytest.approx(final_val, rel=1e-6))

    with open(csv_logger.metrics_file, newline="") as f:
        rows = list(csv.DictReader(f))
    for name in ["train/loss", "train/mae", "train/loss_epoch", "train/mae_epoch", "val/loss", "val/mae", "lr", "epoch"]:
        logged = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in (None, "")]
        assert logged == [(s, pytest.approx(v, rel=1e-6)) for s, v in mem.values(name)], name

    acc = EventAccumulator(str(tb.log_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_epoch", "val/loss", "val/mae", "lr", "epoch"} <= tags
    for name in ["train/loss", "train/loss_epoch", "val/loss"]:
        events = [(e.step, e.value) for e in acc.Scalars(name)]
        assert events == [(s, pytest.approx(v, rel=1e-6)) for s, v in mem.values(name)], name


def test_callback_metrics_refresh_only_at_log_points():
    step, state, loader = setup()
    rec = Recorder()
    run(step, state, loader, max_epochs=1, log_every_n_steps=2, callbacks=[rec])
    batch_metrics = [m for e, m in zip(rec.events, rec.metrics) if e[0] == "batch"]
    assert "train/loss" not in batch_metrics[0]
    assert batch_metrics[1]["train/loss"] == batch_metrics[2]["train/loss"] != batch_metrics[3]["train/loss"]


def test_signal_log_values_are_logged():
    class Extra(Callback):
        def on_epoch_end(self, ctx):
            return Signal(log={"custom": 2.5})

    step, state, loader = setup()
    logger = MemoryLogger()
    rec = Recorder()
    run(step, state, loader, max_epochs=1, loggers=[logger], callbacks=[Extra(), rec])
    assert logger.values("custom") == [(5, 2.5)]
    assert rec.metrics[-1]["custom"] == 2.5


# ----------------------------------------------------------------------------- step options


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
def test_precision_modes_run(precision):
    step, state, loader = setup(opt=lf.optim.adam(0.1))
    logger = MemoryLogger()
    out = run(step, state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), max_epochs=2,
              precision=precision, loggers=[logger], log_every_n_steps=1)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert out.params["w"].dtype == expected and int(out.step) == 10
    losses = [v for _, v in logger.values("train/loss")]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    initial = loss_fn(state.params, _all(loader))[0].item()
    assert logger.values("val/loss")[-1][1] < 0.9 * initial
    assert (out.loss_scale is not None) == (precision == "16-mixed")


def _all(loader):
    return tuple(torch.cat(parts) for parts in zip(*loader.iter_epoch(0)))


def test_16_mixed_skips_an_inf_step_and_halves_the_scale():
    x, y, params = problem(16)
    x, y = x / 100, y / 100  # small grads: finite in fp16 even at the initial scale 2**16
    x_bad = x.clone()
    x_bad[0, 0] = 1e30  # the fp16 forward overflows: grads are not finite
    batches = [(x_bad, y), (x, y)]
    opt = lf.optim.sgd(0.01)
    state = lf.TrainState.create(params=params, optimizer=opt)
    logger = MemoryLogger()
    out = run(lf.train_step(loss_fn, opt), state, batches, max_steps=1, precision="16-mixed", loggers=[logger],
              log_every_n_steps=1)
    assert int(out.step) == 1
    assert torch.equal(out.params["w"], params["w"]) and torch.equal(out.params["b"], params["b"])
    assert out.loss_scale.scale.item() == 2.0**15
    assert logger.values("train/loss_scale") == [(1, 2.0**16)]
    out = run(lf.train_step(loss_fn, opt), state, batches, max_steps=2, precision="16-mixed")
    assert out.loss_scale.scale.item() == 2.0**15 and not torch.equal(out.params["w"], params["w"])


def test_accumulate_grad_batches_equals_one_big_batch():
    x, y, params = problem(32)
    opt = lf.optim.sgd(0.1)
    state = lf.TrainState.create(params=params, optimizer=opt)
    small = lf.data.ArrayLoader((x, y), batch_size=4, shuffle=False)
    big = lf.data.ArrayLoader((x, y), batch_size=12, shuffle=False, drop_last=True)
    big = lf.data.ArrayLoader((x, y), batch_size=12, shuffle=False)
    step = lf.train_step(loss_fn, opt)
    acc = run(step, state, small, max_steps=6, accumulate_grad_batches=3)
    ref = run(step, state, big, max_steps=2)
    for k in params:
        torch.testing.assert_close(acc.params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(acc.params["w"], params["w"])


def test_gradient_clip_val_clips_the_global_norm():
    x, y, params = problem(8)
    opt = lf.optim.sgd(1.0)
    state = lf.TrainState.create(params=params, optimizer=opt)
    out = run(lf.train_step(loss_fn, opt), state, [(x, y)], max_steps=1, gradient_clip_val=0.25)
    delta = lf.tree.global_norm(lf.tree.map(lambda a, b: a - b, out.params, params))
    assert delta.item() == pytest.approx(0.25, rel=1e-5)
    unclipped = run(lf.train_step(loss_fn, opt), state, [(x, y)], max_steps=1)
    assert lf.tree.global_norm(lf.tree.map(lambda a, b: a - b, unclipped.params, params)).item() > 1.0


def test_hand_written_step_with_a_dict_state_and_a_list_of_batches():
    x, y, _ = problem(16)

    def step(s, batch):
        g = torch.func.grad(lambda w: loss_fn({"w": w, "b": torch.zeros(())}, batch)[0])(s["w"])
        return {"w": s["w"] - 0.1 * g, "k": s["k"] + 1}, {"loss": loss_fn({"w": s["w"], "b": torch.zeros(())}, batch)[0]}

    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    out = run(step, {"w": torch.zeros(D), "k": torch.zeros((), dtype=torch.int64)}, batches, max_epochs=3)
    assert int(out["k"]) == 6 and out["w"].abs().sum() > 0


def test_device_auto_and_sigterm_handler_restored():
    from lightfn._device import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    before = signal.getsignal(signal.SIGTERM)
    step, state, loader = setup()
    out = run(step, state, loader, max_epochs=1, device="cpu")
    assert out.params["w"].device.type == "cpu"
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------- bad input


def test_empty_data_and_zero_batches_are_refused():
    step, state, _ = setup()
    with pytest.raises(FitError, match="no batches"):
        run(step, state, [])
    x, y, _ = problem(5)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, drop_last=True)
    with pytest.raises(FitError, match="batch size larger than the data"):
        run(step, state, loader)
    with pytest.raises(lf.data.DataError, match="larger than the dataset"):
        lf.data.ArrayLoader((x, y), batch_size=8)
    with pytest.raises(FitError, match="yielded no batches in epoch 1"):
        run(step, state, iter([(x, y)]), max_epochs=2)
    with pytest.raises(FitError, match="val_data yielded no batches"):
        run(step, state, [(x, y)], val_data=[], eval_step=lf.eval_step(loss_fn))


def test_nan_loss_with_terminate_on_nan_names_the_step_and_the_metric(tmp_path):
    x, y, params = problem()
    x[17, 0] = float("nan")  # in the third batch
    opt = lf.optim.sgd(0.05)
    state = lf.TrainState.create(params=params, optimizer=opt)
    loader = lf.data.ArrayLoader((x, y), batch_size=8, shuffle=False)
    with pytest.raises(lf.callbacks.NonFiniteLossError, match=r"train/loss = nan at step 3 \(epoch 0, batch 3"):
        run(lf.train_step(loss_fn, opt), state, loader, log_every_n_steps=1,
            callbacks=[lf.callbacks.TerminateOnNaN(), ModelCheckpoint(tmp_path, save_on_exception=True)])
    assert lf.load(tmp_path / "exception-epoch=0-step=3.safetensors")["params"]["w"].isnan().all()


def test_step_returning_the_wrong_structure_is_named():
    x, y, _ = problem(8)
    state = {"w": torch.zeros(D)}
    with pytest.raises(StepError, match=r"must return \(new_state, metrics_dict\)"):
        run(lambda s, b: s, state, [(x, y)])
    with pytest.raises(StepError, match=r"\['v'\]"):
        run(lambda s, b: ({"v": s["w"]}, {}), state, [(x, y)])
    with pytest.raises(StepError, match=r"\['w'\].*expected tensor\(4,\) float32, got tensor\(2,\)"):
        run(lambda s, b: ({"w": s["w"][:2]}, {}), state, [(x, y)])
    with pytest.raises(StepError, match="metrics as a dict"):
        run(lambda s, b: (s, [1.0]), state, [(x, y)])


def test_non_scalar_metrics_are_named():
    x, y, _ = problem(8)
    state = {"w": torch.zeros(D)}
    with pytest.raises(StepError, match="metric 'per_sample'.*shape \\(8,\\)"):
        run(lambda s, b: (s, {"loss": b[1].mean(), "per_sample": b[1]}), state, [(x, y)])
    with pytest.raises(StepError, match="metric 'acc'.*not a tensor"):
        run(lambda s, b: (s, {"acc": 0.5}), state, [(x, y)])
    with pytest.raises(StepError, match="metric 'v' of the eval step"):
        run(lambda s, b: (s, {}), state, [(x, y)], val_data=[(x, y)], eval_step=lambda s, b: {"v": b[0]})


def test_misconfigurations_are_refused_with_what_to_do(tmp_path):
    step, state, loader = setup()
    with pytest.raises(FitError, match="needs an eval_step"):
        run(step, state, loader, val_data=loader)
    with pytest.raises(FitError, match="lf.optim.multi_steps"):
        run(lambda s, b: (s, {}), {"w": torch.zeros(1)}, loader, accumulate_grad_batches=2)
    with pytest.raises(FitError, match="autocast"):
        run(lambda s, b: (s, {}), {"w": torch.zeros(1)}, loader, precision="bf16-mixed")
    stepped = state.replace(step=torch.tensor(3))
    with pytest.raises(FitError, match="already taken 3 steps"):
        run(step, stepped, loader, gradient_clip_val=1.0)
    with pytest.raises(FitError, match="limit_train_batches"):
        run(step, state, loader, limit_train_batches=1.5)
    with pytest.raises(FitError, match="val_check_interval=9"):
        run(step, state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), val_check_interval=9)
    with pytest.raises(FitError, match='resume_from="last" needs a ModelCheckpoint'):
        run(step, state, loader, resume_from="last")
    with pytest.raises(lf.callbacks.MisconfigurationError, match="logged metrics: .*'val/loss'"):
        run(step, state, loader, val_data=loader, eval_step=lf.eval_step(loss_fn), max_epochs=2,
            callbacks=[ModelCheckpoint(tmp_path, monitor="val/los")])
    with pytest.raises(lf.callbacks.MisconfigurationError, match="'train/loss_epoch'"):
        run(step, state, loader, max_epochs=2, callbacks=[ModelCheckpoint(tmp_path, monitor="train/los")])
    with pytest.raises(FitError, match="returned a str"):
        run(step, state, loader, callbacks=[type("Bad", (Callback,), {"on_fit_start": lambda self, ctx: "stop"})()])


# ----------------------------------------------------------------------------- several validation sets


def _val_set(n, seed, batch_size):
    x, y, _ = problem(n, seed)
    return lf.data.ArrayLoader((x, y), batch_size=batch_size, shuffle=False, drop_last=False)


def test_a_dict_of_validation_sets_logs_each_under_its_name_and_can_be_monitored(tmp_path):
    step, state, loader = setup()
    clean, noisy = _val_set(12, 1, 5), _val_set(9, 2, 4)  # uneven last batches in both
    logger, rec = MemoryLogger(), Recorder()
    ckpt = ModelCheckpoint(tmp_path, monitor="val/noisy/loss", save_top_k=1)
    stopper = lf.callbacks.EarlyStopping(monitor="val/clean/mae", patience=5)
    evaluate = lf.eval_step(loss_fn)
    out = run(step, state, loader, val_data={"clean": clean, "noisy": noisy}, eval_step=evaluate, max_epochs=3,
              loggers=[logger], callbacks=[rec, ckpt, stopper])
    names = {k for row in logger.by_step().values() for k in row if k.startswith("val/")}
    assert names == {"val/clean/loss", "val/clean/mae", "val/noisy/loss", "val/noisy/mae"}
    last = logger.by_step()[15]
    # each set's values are exactly lf.validate's on that set alone
    for name, data in (("clean", clean), ("noisy", noisy)):
        alone = lf.validate(evaluate, out, data, progress=False)
        assert (last[f"val/{name}/loss"], last[f"val/{name}/mae"]) == (alone["val/loss"], alone["val/mae"])
    assert lf.validate(evaluate, out, {"clean": clean, "noisy": noisy}, progress=False) == {
        k: v for k, v in last.items() if k.startswith("val/")}
    noisy_losses = [v for _, v in logger.values("val/noisy/loss")]
    assert len(noisy_losses) == 3 and ckpt.best_model_score == min(noisy_losses)
    assert "val_noisy_loss=" in ckpt.best_model_path
    assert stopper.state_dict()["best_score"] == min(v for _, v in logger.values("val/clean/mae"))
    sanity = [m for e, m in zip(rec.events, rec.metrics) if e[1] == "sanity"]
    assert len(sanity) == 1 and {"val/clean/loss", "val/noisy/loss"} <= set(sanity[0])  # both sets sanity-checked


def test_a_list_of_loaders_is_named_by_position_and_a_list_of_batches_stays_one_set():
    step, state, loader = setup()
    x, y, _ = problem(8, 3)
    evaluate = lf.eval_step(loss_fn)
    logger = MemoryLogger()
    out = run(step, state, loader, val_data=[_val_set(10, 1, 4), [(x[:5], y[:5]), (x[5:], y[5:])]], eval_step=evaluate,
              max_epochs=1, loggers=[logger], limit_val_batches=1)
    row = logger.by_step()[5]
    assert {k for k in row if k.startswith("val/")} == {"val/0/loss", "val/0/mae", "val/1/loss", "val/1/mae"}
    assert row["val/1/loss"] == pytest.approx(loss_fn(out.params, (x[:5], y[:5]))[0].item(), rel=1e-6)  # 1 batch per set
    logger = MemoryLogger()
    run(step, state, loader, val_data=[(x[:5], y[:5]), (x[5:], y[5:])], eval_step=evaluate, max_epochs=1, loggers=[logger])
    assert {k for k in logger.by_step()[5] if k.startswith("val/")} == {"val/loss", "val/mae"}


def test_unclear_validation_data_is_refused_saying_what_to_pass():
    step, state, loader = setup()
    x, y, _ = problem(8, 3)
    evaluate = lf.eval_step(loss_fn)
    forms = r"pass one loader .*a dict of name -> loader .*a list of loaders"
    with pytest.raises(FitError, match=r"val_data\['x'\] is a tensor .*not a loader.*val_data=\[batch\]"):
        run(step, state, loader, val_data={"x": x, "y": y}, eval_step=evaluate)  # one batch given as a dict
    with pytest.raises(FitError, match=r"mixes batches \(val_data\[0\] is a tuple.*loaders \(val_data\[1\] is a ArrayLoader\); " + forms):
        run(step, state, loader, val_data=[(x, y), _val_set(8, 1, 4)], eval_step=evaluate)
    with pytest.raises(FitError, match=r"val_data\[1\] is an empty list, neither a batch"):
        run(step, state, loader, val_data=[[(x, y)], []], eval_step=evaluate)
    with pytest.raises(FitError, match="non-empty strings without '/'"):
        run(step, state, loader, val_data={"a/b": [(x, y)]}, eval_step=evaluate)
    with pytest.raises(FitError, match="an empty dict"):
        run(step, state, loader, val_data={}, eval_step=evaluate)


# ----------------------------------------------------------------------------- compiled


@pytest.mark.compile
def test_compiled_fit_matches_eager_and_never_touches_the_callers_state():
    x, y, params = problem(48)
    opt = lf.optim.adam(0.01)
    state = lf.TrainState.create(params=params, optimizer=opt)
    loader = lf.data.ArrayLoader((x, y), batch_size=16, shuffle=True, seed=1)
    step = lf.train_step(loss_fn, opt)
    ev = lf.eval_step(loss_fn)
    mem_c, mem_e = MemoryLogger(), MemoryLogger()
    compiled = fit(step, state, loader, val_data=loader, eval_step=ev, max_epochs=3, jit="sync", progress=False,
                   loggers=[mem_c], log_every_n_steps=2)
    eager = fit(step, state, loader, val_data=loader, eval_step=ev, max_epochs=3, jit=False, progress=False,
                loggers=[mem_e], log_every_n_steps=2)
    assert int(compiled.step) == 9 and int(state.step) == 0
    assert torch.count_nonzero(state.params["w"]) == 0 and torch.count_nonzero(state.opt_state[0].mu["w"]) == 0
    for k in params:
        torch.testing.assert_close(compiled.params[k], eager.params[k], rtol=1e-5, atol=1e-6)
    for name in ["train/loss", "train/loss_epoch", "val/loss", "val/mae"]:
        assert [s for s, _ in mem_c.values(name)] == [s for s, _ in mem_e.values(name)]
        assert [v for _, v in mem_c.values(name)] == pytest.approx([v for _, v in mem_e.values(name)], rel=1e-5)
    # one graph for the step with its accumulation, one for the eval step: no graph breaks
    assert not torch._dynamo.utils.counters["graph_break"]
