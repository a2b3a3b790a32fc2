"""The standard callbacks decide correctly on scripted sequences of hand-built Contexts."""

from __future__ import annotations

import datetime
import json
import math

import pytest
import torch

import lightfn as lf
from lightfn.callbacks.base import Context
from lightfn.callbacks import EarlyStopping, MisconfigurationError
from lightfn.callbacks.lr_monitor import LearningRateMonitor, lr_log_names
from lightfn.callbacks import NonFiniteLossError, TerminateOnNaN
from lightfn.callbacks.timer import Timer, parse_duration


def ctx(metrics=None, *, step=0, epoch=0, batch_idx=0, stage="train", elapsed=0.0, resumed=0.0, state=None) -> Context:
    """``resumed``: seconds of the runs this one continues (fit carries them in its loop
    position and shows ``total_elapsed = resumed + elapsed``)."""
    return Context(state=state, step=step, epoch=epoch, batch_idx=batch_idx, metrics=dict(metrics or {}),
                   stage=stage, elapsed=elapsed, total_elapsed=resumed + elapsed)


def run_checks(es: EarlyStopping, values, *, monitor="val/loss", start_epoch=0):
    """Feed one validation result per epoch; return the index of the first stop (or None)
    and every returned signal."""
    signals = []
    for i, v in enumerate(values):
        sig = es.on_validation_end(ctx({monitor: v, "train/loss": 0.5}, epoch=start_epoch + i, stage="validate"))
        signals.append(sig)
    stops = [i for i, s in enumerate(signals) if s is not None and s.stop]
    return (stops[0] if stops else None), signals


# ---------------------------------------------------------------- EarlyStopping


def test_patience_counts_checks_without_improvement():
    es = EarlyStopping(monitor="val/loss", patience=3)
    first, signals = run_checks(es, [1.0, 0.9, 0.95, 0.92, 0.91])
    assert first == 4
    assert all(s is None for s in signals[:4])
    assert es.wait_count == 3 and es.best_score == 0.9 and es.stopped_epoch == 4
    reason = signals[4].reason
    assert "val/loss" in reason and "0.9" in reason and "patience 3" in reason


def test_improvement_resets_the_wait_count():
    es = EarlyStopping(patience=3)
    waits = []
    for v in [1.0, 1.1, 1.2, 0.5, 0.6, 0.7]:
        assert es.on_validation_end(ctx({"val/loss": v}, stage="validate")) is None
        waits.append(es.wait_count)
    assert waits == [0, 1, 2, 0, 1, 2]
    sig = es.on_validation_end(ctx({"val/loss": 0.8}, stage="validate"))
    assert sig.stop and es.best_score == 0.5


def test_patience_zero_stops_at_the_first_non_improvement():
    assert run_checks(EarlyStopping(patience=0), [3.0, 2.0, 2.0])[0] == 2


def test_min_delta_min_mode():
    # Values exact in binary, so "by more than min_delta" is tested at its boundary.
    es = EarlyStopping(patience=2, min_delta=0.25)
    assert es.on_validation_end(ctx({"val/loss": 1.0}, stage="validate")) is None
    assert es.on_validation_end(ctx({"val/loss": 0.875}, stage="validate")) is None  # lower, not enough
    assert (es.wait_count, es.best_score) == (1, 1.0)
    assert es.on_validation_end(ctx({"val/loss": 0.5}, stage="validate")) is None
    assert (es.wait_count, es.best_score) == (0, 0.5)
    # Exactly best - min_delta is not an improvement by *more than* min_delta.
    assert es.on_validation_end(ctx({"val/loss": 0.25}, stage="validate")) is None
    assert (es.wait_count, es.best_score) == (1, 0.5)
    sig = es.on_validation_end(ctx({"val/loss": 0.375}, stage="validate"))
    assert sig.stop and es.best_score == 0.5 and "more than 0.25" in sig.reason


def test_max_mode_and_min_delta():
    es = EarlyStopping(monitor="val/acc", mode="max", patience=2, min_delta=0.01)
    seq = [0.50, 0.60, 0.605, 0.62, 0.615, 0.625]
    first, _ = run_checks(es, seq, monitor="val/acc")
    # 0.605 does not beat 0.60 by > 0.01 (wait 1); 0.62 does (reset); 0.615, 0.625 don't.
    assert first == 5 and es.best_score == 0.62 and es.wait_count == 2
    # Lower is worse in max mode: a falling accuracy never counts as an improvement.
    es2 = EarlyStopping(monitor="val/acc", mode="max", patience=3)
    assert run_checks(es2, [0.9, 0.8, 0.7, 0.6], monitor="val/acc")[0] == 3


def test_stopping_threshold_both_modes():
    es = EarlyStopping(patience=10, stopping_threshold=0.3)
    first, signals = run_checks(es, [0.5, 0.4, 0.3, 0.29])
    assert first == 3  # 0.3 is not below 0.3
    assert "stopping threshold" in signals[3].reason and "0.29" in signals[3].reason
    es = EarlyStopping(monitor="val/acc", mode="max", patience=10, stopping_threshold=0.95)
    assert run_checks(es, [0.5, 0.9, 0.96], monitor="val/acc")[0] == 2


def test_divergence_threshold_both_modes():
    es = EarlyStopping(patience=10, divergence_threshold=5.0)
    first, signals = run_checks(es, [1.0, 4.0, 5.0, 7.5])
    assert first == 3 and "divergence threshold" in signals[3].reason and "7.5" in signals[3].reason
    es = EarlyStopping(monitor="val/acc", mode="max", patience=10, divergence_threshold=0.1)
    assert run_checks(es, [0.5, 0.2, 0.05], monitor="val/acc")[0] == 2


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_stops_on_non_finite(bad):
    es = EarlyStopping(patience=10)
    first, signals = run_checks(es, [1.0, bad])
    assert first == 1 and "not finite" in signals[1].reason and "val/loss" in signals[1].reason
    assert es.best_score == 1.0


def test_check_finite_false_counts_nan_as_no_improvement():
    es = EarlyStopping(patience=2, check_finite=False)
    assert run_checks(es, [1.0, math.nan])[0] is None
    assert es.wait_count == 1 and es.best_score == 1.0
    assert run_checks(es, [math.nan])[0] == 0


def test_missing_monitor_lists_logged_names():
    es = EarlyStopping(monitor="val/los")
    with pytest.raises(MisconfigurationError) as info:
        es.on_validation_end(ctx({"val/loss": 1.0, "train/loss": 2.0, "lr": 0.1}, stage="validate"))
    msg = str(info.value)
    assert "'val/los'" in msg and "'val/loss'" in msg and "'train/loss'" in msg and "'lr'" in msg
    assert isinstance(info.value, lf.LightfnError) and isinstance(info.value, ValueError)


def test_auto_mode_without_validation_checks_at_epoch_end_and_explains_a_missing_val_metric():
    es = EarlyStopping()
    es.on_fit_start(ctx())
    with pytest.raises(MisconfigurationError, match="check_on_train_epoch_end=False"):
        es.on_epoch_end(ctx({"train/loss": 1.0, "train/loss_epoch": 1.0}))
    es = EarlyStopping(monitor="train/loss_epoch", patience=1)
    es.on_fit_start(ctx())
    assert es.on_epoch_end(ctx({"train/loss_epoch": 1.0}, epoch=0)) is None
    sig = es.on_epoch_end(ctx({"train/loss_epoch": 1.5}, epoch=1))
    assert sig.stop and es.stopped_epoch == 1


def test_where_it_checks():
    # Sanity validation never counts, but tells the default mode that the fit validates.
    es = EarlyStopping(patience=1)
    es.on_fit_start(ctx())
    assert es.on_validation_end(ctx({"val/loss": 0.1}, stage="sanity")) is None
    assert es.best_score == math.inf and es.wait_count == 0
    assert es.on_validation_end(ctx({"val/loss": 1.0}, stage="validate")) is None
    # After validation, epoch end does not check again (that would count one value twice).
    assert es.on_epoch_end(ctx({"val/loss": 1.0})) is None
    assert es.wait_count == 0
    assert es.on_validation_end(ctx({"val/loss": 2.0}, stage="validate")).stop

    # True: only at epoch end.
    es = EarlyStopping(patience=1, check_on_train_epoch_end=True)
    es.on_fit_start(ctx())
    for v in (1.0, 2.0, 3.0):
        assert es.on_validation_end(ctx({"val/loss": v}, stage="validate")) is None
    assert es.best_score == math.inf
    assert es.on_epoch_end(ctx({"val/loss": 1.0})) is None
    assert es.on_epoch_end(ctx({"val/loss": 2.0})).stop

    # False: only after validation, even in a fit that has not validated yet.
    es = EarlyStopping(patience=1, check_on_train_epoch_end=False)
    es.on_fit_start(ctx())
    assert es.on_epoch_end(ctx({"train/loss": 1.0})) is None  # no monitor, no check, no error
    assert es.on_validation_end(ctx({"val/loss": 1.0}, stage="validate")) is None
    assert es.on_validation_end(ctx({"val/loss": 1.0}, stage="validate")).stop


def test_state_dict_round_trip_mid_run_gives_the_same_decisions():
    seq = [1.0, 0.8, 0.85, 0.7, 0.75, 0.74, 0.72, 0.71, 0.9]
    reference = EarlyStopping(patience=4, min_delta=0.005)
    ref_first, ref_signals = run_checks(reference, seq)
    assert ref_first == 7

    for cut in range(len(seq)):
        before = EarlyStopping(patience=4, min_delta=0.005)
        run_checks(before, seq[:cut])
        saved = json.loads(json.dumps(before.state_dict(), allow_nan=False))  # strict JSON
        after = EarlyStopping(patience=4, min_delta=0.005)
        after.load_state_dict(saved)
        first, signals = run_checks(after, seq[cut:], start_epoch=cut)
        assert [None if s is None else s.reason for s in signals] == [
            None if s is None else s.reason for s in ref_signals[cut:]
        ]
        assert (after.wait_count, after.best_score, after.stopped_epoch) == (
            reference.wait_count, reference.best_score, reference.stopped_epoch
        )


def test_state_dict_of_a_fresh_callback_and_a_monitor_mismatch():
    es = EarlyStopping(mode="max")
    state = json.loads(json.dumps(es.state_dict(), allow_nan=False))
    again = EarlyStopping(mode="max")
    again.load_state_dict(state)
    assert again.best_score == -math.inf
    with pytest.raises(MisconfigurationError, match="same monitor and mode"):
        EarlyStopping(mode="min").load_state_dict(state)


@pytest.mark.parametrize("kw", [dict(mode="avg"), dict(patience=-1), dict(min_delta=-0.1)])
def test_bad_arguments(kw):
    with pytest.raises(MisconfigurationError):
        EarlyStopping(**kw)


# ---------------------------------------------------------------- Timer


@pytest.mark.parametrize(
    "duration, seconds",
    [
        (90, 90.0),
        (1.5, 1.5),
        (datetime.timedelta(hours=1, minutes=1), 3660.0),
        (dict(days=1, hours=2, minutes=3, seconds=4), 93784.0),
        ({"minutes": 5}, 300.0),
        ("01:02:03:04", 93784.0),
        ("00:12:00:00", 43200.0),
        (" 0:0:0:30 ", 30.0),
    ],
)
def test_timer_parses_each_duration_form(duration, seconds):
    assert parse_duration(duration) == seconds
    assert Timer(duration=duration).duration == seconds


@pytest.mark.parametrize("bad, match", [
    ("12:00", "DD:HH:MM:SS"),
    ("1:2:3:x", "DD:HH:MM:SS"),
    (dict(hour=1), "unknown duration keys"),
    (-5, ">= 0"),
    ([1, 2], "list"),
    (True, "must be a time"),
])
def test_timer_rejects_bad_durations(bad, match):
    with pytest.raises(MisconfigurationError, match=match):
        Timer(duration=bad)


def test_timer_stops_when_elapsed_reaches_the_duration_at_the_step_interval():
    t = Timer(duration=10)
    assert t.start_time is None
    t.on_fit_start(ctx(elapsed=0.0))
    assert isinstance(t.start_time, float)
    assert t.on_train_batch_end(ctx(step=1, elapsed=4.0)) is None
    assert t.time_elapsed() == 4.0 and t.time_remaining() == 6.0
    assert t.on_train_batch_end(ctx(step=2, elapsed=9.9)) is None
    sig = t.on_train_batch_end(ctx(step=3, epoch=1, elapsed=10.4))
    assert sig.stop and "0:00:10" in sig.reason and "step 3" in sig.reason and "epoch 1" in sig.reason
    assert t.time_remaining() == 0.0


def test_timer_epoch_interval_checks_only_at_epoch_end():
    t = Timer(duration=dict(seconds=5), interval="epoch")
    t.on_fit_start(ctx())
    assert t.on_train_batch_end(ctx(step=1, elapsed=50.0)) is None
    assert t.time_elapsed() == 50.0
    assert t.on_epoch_end(ctx(step=1, elapsed=51.0)).stop


def test_timer_without_duration_only_measures():
    t = Timer()
    t.on_fit_start(ctx())
    assert t.on_train_batch_end(ctx(elapsed=1e6)) is None
    assert t.time_elapsed() == 1e6 and t.time_remaining() is None


def test_timer_resume_continues_the_clock():
    first = Timer(duration=10)
    first.on_fit_start(ctx())
    assert first.on_train_batch_end(ctx(step=5, elapsed=7.0)) is None
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved == {"time_elapsed": 7.0}

    resumed = Timer(duration=10)
    resumed.load_state_dict(saved)
    assert resumed.time_elapsed() == 7.0  # right after the resume, before any hook
    resumed.on_fit_start(ctx(step=5, elapsed=0.0, resumed=7.0))  # the new fit's own clock starts at 0
    assert resumed.on_train_batch_end(ctx(step=6, elapsed=2.0, resumed=7.0)) is None
    assert resumed.time_elapsed() == 9.0
    assert resumed.on_train_batch_end(ctx(step=7, elapsed=3.5, resumed=7.0)).stop  # 7 + 3.5 >= 10


# ---------------------------------------------------------------- TerminateOnNaN


def test_terminate_on_nan_passes_finite_and_missing_values():
    guard = TerminateOnNaN(monitor=("train/loss", "val/loss"))
    guard.on_fit_start(ctx())
    assert guard.on_train_batch_end(ctx({}, step=1)) is None
    assert guard.on_train_batch_end(ctx({"train/loss": 1e30}, step=2)) is None
    assert guard.on_epoch_end(ctx({"train/loss": 0.5, "other": math.nan})) is None


def test_terminate_on_nan_default_watches_the_epoch_mean_too():
    guard = TerminateOnNaN()
    guard.on_fit_start(ctx())
    # An epoch shorter than log_every_n_steps logs only the epoch mean.
    with pytest.raises(NonFiniteLossError, match="train/loss_epoch = nan at step 3"):
        guard.on_epoch_end(ctx({"train/loss_epoch": math.nan}, step=3))


def test_terminate_on_nan_refuses_to_watch_names_that_are_never_logged():
    guard = TerminateOnNaN()
    guard.on_fit_start(ctx())
    assert guard.on_train_batch_end(ctx({"train/g_loss": 1.0}, step=1)) is None  # not yet an error
    with pytest.raises(MisconfigurationError) as info:
        guard.on_epoch_end(ctx({"train/g_loss": 1.0, "train/g_loss_epoch": 1.0}, step=2))
    msg = str(info.value)
    assert "'train/loss'" in msg and "'train/g_loss_epoch'" in msg and "epoch 0" in msg
    with pytest.raises(MisconfigurationError):
        TerminateOnNaN(monitor=())


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_terminate_on_nan_names_step_epoch_metric_and_value(bad):
    guard = TerminateOnNaN()
    with pytest.raises(NonFiniteLossError) as info:
        guard.on_train_batch_end(ctx({"train/loss": bad}, step=12, epoch=1, batch_idx=3))
    msg = str(info.value)
    assert f"train/loss = {bad}" in msg and "step 12" in msg and "epoch 1" in msg and "batch 3" in msg
    assert isinstance(info.value, lf.LightfnError) and isinstance(info.value, FloatingPointError)


def test_terminate_on_nan_watches_val_metrics_after_validation():
    guard = TerminateOnNaN(monitor="val/loss")
    assert guard.monitor == ("val/loss",)
    assert guard.on_train_batch_end(ctx({"train/loss": math.nan})) is None  # not monitored
    with pytest.raises(NonFiniteLossError, match=r"val/loss = nan at step 40 \(epoch 2"):
        guard.on_validation_end(ctx({"val/loss": math.nan}, step=40, epoch=2, stage="validate"))


# ---------------------------------------------------------------- LearningRateMonitor


def _params():
    return {"enc": torch.zeros(2), "dec": torch.zeros(3)}


def _advance(state: lf.TrainState, optimizer, n: int) -> lf.TrainState:
    """n real optimizer updates with constant grads (no training loop needed)."""
    opt_state = state.opt_state
    params = state.params
    for _ in range(n):
        grads = lf.tree.map(torch.ones_like, params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = lf.optim.apply_updates(params, updates)
    return state.replace(params=params, opt_state=opt_state, step=state.step + n)


def test_lr_monitor_logs_the_rate_the_last_update_used_every_n_steps():
    opt = lf.optim.sgd(lf.optim.cosine_decay_schedule(0.1, 10))
    state = lf.TrainState.create(params=_params(), optimizer=opt)
    mon = LearningRateMonitor(log_every_n_steps=3)
    assert mon.on_fit_start(ctx(state=state)) is None
    state = _advance(state, opt, 3)
    assert mon.on_train_batch_end(ctx(step=2, state=state)) is None
    sig = mon.on_train_batch_end(ctx(step=3, state=state))
    # The third update used the schedule at count 2.
    assert sig.log == {"lr": pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 2 / 10)), rel=1e-6)}
    # A step seen twice (e.g. by a resumed run) is logged once.
    assert mon.on_train_batch_end(ctx(step=3, batch_idx=4, state=state)) is None
    assert mon.on_epoch_end(ctx(step=3, state=state)) is None  # step interval: not at epoch end


def test_lr_monitor_epoch_interval():
    opt = lf.optim.adam(1e-3)
    state = lf.TrainState.create(params=_params(), optimizer=opt)
    mon = LearningRateMonitor(logging_interval="epoch", log_every_n_steps=1)
    mon.on_fit_start(ctx(state=state))
    assert mon.on_train_batch_end(ctx(step=1, state=state)) is None
    assert mon.on_epoch_end(ctx(step=1, state=state)).log == {"lr": pytest.approx(1e-3)}


def test_lr_monitor_names_several_rates_by_path():
    opt = lf.optim.multi_transform({"a": lf.optim.adam(1e-3), "b": lf.optim.sgd(0.1)}, {"enc": "a", "dec": "b"})
    state = lf.TrainState.create(params=_params(), optimizer=opt)
    mon = LearningRateMonitor(log_every_n_steps=1)
    mon.on_fit_start(ctx(state=state))
    assert mon.on_train_batch_end(ctx(step=1, state=state)).log == {
        "lr/a": pytest.approx(1e-3), "lr/b": pytest.approx(0.1)}

    # A custom step's state holding two optimizers (a GAN): the whole state is searched.
    g = lf.TrainState.create(params=_params(), optimizer=lf.optim.adam(2e-4))
    d = lf.TrainState.create(params=_params(), optimizer=lf.optim.sgd(0.05))
    gan = {"g": g, "d": d}
    mon.on_fit_start(ctx(state=gan))
    assert mon.on_train_batch_end(ctx(step=2, state=gan)).log == {
        "lr/g": pytest.approx(2e-4), "lr/d": pytest.approx(0.05)}


def test_lr_log_names_keep_what_distinguishes():
    assert lr_log_names(["[1][1]"]) == {"[1][1]": "lr"}
    assert lr_log_names(["[0]['a'][0][1]", "[0]['b'][0][0]"]) == {"[0]['a'][0][1]": "lr/a", "[0]['b'][0][0]": "lr/b"}
    # Positions are the only difference: keep them.
    assert lr_log_names(["[0][1]", "[1][1]"]) == {"[0][1]": "lr/0/1", "[1][1]": "lr/1/1"}


def test_lr_monitor_errors():
    state = lf.TrainState.create(params=_params(), optimizer=lf.optim.identity())
    with pytest.raises(MisconfigurationError, match="no learning rate in state.opt_state"):
        LearningRateMonitor().on_fit_start(ctx(state=state))
    with pytest.raises(MisconfigurationError, match="momentum"):
        LearningRateMonitor(log_momentum=True)
    with pytest.raises(MisconfigurationError, match="logging_interval"):
        LearningRateMonitor(logging_interval="batch")
    with pytest.raises(MisconfigurationError, match="log_every_n_steps"):
        LearningRateMonitor(log_every_n_steps=0)


def test_exported_from_the_callbacks_package():
    assert lf.callbacks.EarlyStopping is EarlyStopping
    assert lf.callbacks.LearningRateMonitor is LearningRateMonitor
    assert lf.callbacks.Timer is Timer
    assert lf.callbacks.TerminateOnNaN is TerminateOnNaN
    assert issubclass(lf.callbacks.NonFiniteLossError, lf.LightfnError)


# ---------------------------------------------------------------- with lf.fit (eager)


def _regression(opt=None):
    """A 1-layer linear regression, a hand-written step and an eval step."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1
    opt = lf.optim.sgd(0.1) if opt is None else opt

    def loss_fn(params, batch):
        xb, yb = batch
        return ((xb @ params["w"] + params["b"] - yb) ** 2).mean()

    def step(state, batch):
        loss, grads = lf.value_and_grad(loss_fn)(state.params, batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = lf.optim.apply_updates(state.params, updates)
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), {"loss": loss}

    def evaluate(state, batch):
        return {"loss": loss_fn(state.params, batch)}

    state = lf.TrainState.create(params={"w": torch.zeros(3), "b": torch.zeros(())}, optimizer=opt)
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    return step, evaluate, state, batches


class _Recorder(lf.callbacks.Callback):
    def __init__(self):
        self.val_losses, self.epochs_ended = [], 0

    def on_validation_end(self, ctx):
        if ctx.stage == "validate":
            self.val_losses.append(ctx.metrics["val/loss"])

    def on_epoch_end(self, ctx):
        self.epochs_ended += 1


def test_fit_early_stopping_ends_the_run_at_the_epoch_it_decides():
    from lightfn.fit import fit

    step, evaluate, state, batches = _regression()
    es = EarlyStopping(monitor="val/loss", patience=2, min_delta=1e-3)
    rec = _Recorder()
    out = fit(step, state, batches, val_data=batches, eval_step=evaluate, max_epochs=100, jit=False,
              callbacks=[rec, es], progress=False, num_sanity_val_steps=0)
    # The run ended early, right after the epoch whose validation triggered the stop.
    assert 2 < es.stopped_epoch < 99
    assert rec.epochs_ended == es.stopped_epoch + 1 == len(rec.val_losses)
    assert int(out.step) == 4 * (es.stopped_epoch + 1)
    # Replaying the logged validation losses through a fresh callback gives the same stop.
    replay = EarlyStopping(monitor="val/loss", patience=2, min_delta=1e-3)
    assert run_checks(replay, rec.val_losses)[0] == es.stopped_epoch
    assert es.best_score == replay.best_score and es.wait_count == replay.wait_count == 2
    # The last losses still fell, but by less than min_delta: they never became the best.
    assert min(rec.val_losses) < es.best_score < min(rec.val_losses) + 1e-3


def test_fit_terminate_on_nan_raises_naming_the_step():
    from lightfn.fit import fit

    step, _, state, batches = _regression()
    xb, yb = batches[2]
    batches[2] = (xb, torch.full_like(yb, math.nan))  # the third batch poisons the loss
    with pytest.raises(NonFiniteLossError, match=r"train/loss = nan at step 3 \(epoch 0, batch 3"):
        fit(step, state, batches, max_epochs=3, jit=False, callbacks=[TerminateOnNaN()], progress=False,
            log_every_n_steps=1)


class _MemoryLogger(lf.loggers.Logger):
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    @property
    def log_dir(self):
        raise NotImplementedError  # never asked for by fit in these tests

    @property
    def version(self):
        return 0


def test_fit_learning_rate_monitor_logs_each_group_at_its_interval():
    from lightfn.fit import fit

    opt = lf.optim.multi_transform(
        {"fast": lf.optim.sgd(0.1), "slow": lf.optim.sgd(lf.optim.linear_schedule(0.01, 0.0, 8))},
        {"w": "fast", "b": "slow"},
    )
    step, _, state, batches = _regression(opt)
    logger = _MemoryLogger()
    fit(step, state, batches, max_epochs=2, jit=False, progress=False, log_every_n_steps=2,
        callbacks=[LearningRateMonitor(log_every_n_steps=2)], loggers=[logger])
    logged = {s: m for s, m in logger.rows if "lr/fast" in m}
    assert sorted(logged) == [2, 4, 6, 8]
    for s, m in logged.items():
        # Step s ran the s-th update, which used the schedule at count s - 1.
        assert m["lr/fast"] == pytest.approx(0.1)
        assert m["lr/slow"] == pytest.approx(0.01 * (1 - (s - 1) / 8), rel=1e-6)


def test_fit_timer_stops_the_run():
    from lightfn.fit import fit

    step, _, state, batches = _regression()
    timer = Timer(duration=0)  # spent before the first check: stop after one step
    out = fit(step, state, batches, max_epochs=5, jit=False, progress=False, callbacks=[timer])
    assert int(out.step) == 1
    assert timer.time_elapsed() > 0 and timer.state_dict()["time_elapsed"] == timer.time_elapsed()


# ---------------------------------------------------------------- callbacks that log and act (in fit)

from pathlib import Path  # noqa: E402

from lightfn.callbacks import Callback, ModelCheckpoint, Signal  # noqa: E402
from lightfn.errors import FitError  # noqa: E402
from memory_logger import MemoryLogger  # noqa: E402


def _problem(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 3.0, 0.5]) + 0.1
    return x, y


def _loss(p, batch):
    x, y = batch
    err = x @ p["w"] + p["b"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def _setup():
    x, y = _problem()
    opt = lf.optim.sgd(0.05)
    state = lf.TrainState.create(params={"w": torch.zeros(4), "b": torch.zeros(())}, optimizer=opt)
    train = lf.data.ArrayLoader((x, y), batch_size=8, shuffle=False)
    val = lf.data.ArrayLoader((x[:16], y[:16]), batch_size=4, shuffle=False)
    return lf.train_step(_loss, opt), state, train, val


def _fit(callbacks, **kw):
    step, state, train, val = _setup()
    kw.setdefault("max_epochs", 2)
    return lf.fit(step, state, train, val_data=val, eval_step=lf.eval_step(_loss), jit=False, progress=False,
                  summary=False, callbacks=callbacks, **kw)


class F1(Callback):
    """Logs a metric of its own after each validation (like a user's F1 score)."""

    def on_validation_end(self, ctx):
        if ctx.stage == "validate":
            return Signal(log={"val/f1": 1.0 / (1.0 + ctx.metrics["val/loss"])})


def test_a_metric_a_callback_logs_is_monitored_by_the_callbacks_after_it(tmp_path):
    es = EarlyStopping(monitor="val/f1", mode="max", patience=5)
    ckpt = ModelCheckpoint(tmp_path, filename="{epoch}-{val_f1:.4f}", monitor="val/f1", mode="max", save_last=False)
    logger = MemoryLogger()
    _fit([F1(), es, ckpt], loggers=[logger])
    f1 = [v for _, v in logger.values("val/f1")]
    losses = [v for _, v in logger.values("val/loss")]
    assert len(f1) == 2 and f1 == [1.0 / (1.0 + v) for v in losses]
    assert es.best_score == max(f1)
    assert ckpt.best_model_score == max(f1) and Path(ckpt.best_model_path).name == f"1-{max(f1):.4f}.safetensors"
    # in list order: a monitor placed before the callback that logs the value does not see it yet
    with pytest.raises(MisconfigurationError, match="val/f1"):
        _fit([EarlyStopping(monitor="val/f1", mode="max"), F1()])


class Zeroes(Callback):
    """Replaces the params with zeros after step ``at`` (keeping a copy of what it returned)."""

    def __init__(self, at):
        self.at, self.returned = at, None

    def on_train_batch_end(self, ctx):
        if ctx.step == self.at:
            new = ctx.state.replace(params=lf.tree.map(torch.zeros_like, ctx.state.params))
            self.returned = lf.tree.map(torch.clone, new)
            return Signal(state=new)


class Snapshots(Callback):
    def __init__(self):
        self.states = {}

    def on_train_batch_end(self, ctx):
        self.states[ctx.step] = lf.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, ctx.state)


def _equal(a, b):
    la, lb = lf.tree.leaves(a), lf.tree.leaves(b)
    return len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb))


def test_a_returned_state_is_seen_by_later_callbacks_and_training_continues_from_it():
    zero, snaps = Zeroes(at=2), Snapshots()
    final = _fit([zero, snaps], max_epochs=1)
    assert _equal(snaps.states[2], zero.returned)  # the next callback in the same hook sees it
    step, _, train, _ = _setup()
    third = list(lf.data.iterate(train, 0))[2]
    expected, _ = step(zero.returned, third)  # step 3 ran on the returned state
    assert _equal(snaps.states[3], expected)
    assert not torch.equal(final.params["w"], torch.zeros(4))


def test_a_returned_state_of_another_structure_is_refused_naming_the_callback_and_path():
    class Bad(Callback):
        def on_train_batch_end(self, ctx):
            return Signal(state=ctx.state.replace(params={**ctx.state.params, "w": torch.zeros(5)}))

    with pytest.raises(FitError) as info:
        _fit([F1(), Bad()])
    msg = str(info.value)
    assert "Bad (callbacks[1])" in msg and "['w']" in msg and "(5,)" in msg and "(4,)" in msg

    class Wider(Callback):
        def on_train_batch_end(self, ctx):
            return Signal(state=ctx.state.replace(params={**ctx.state.params, "extra": torch.zeros(1)}))

    with pytest.raises(FitError, match=r"(?s)extra.*Wider"):
        _fit([Wider()])


def test_changing_ctx_state_in_place_is_refused_naming_the_callback_and_path():
    class Mutate(Callback):
        def on_train_batch_end(self, ctx):
            ctx.state.params["b"].add_(1.0)

    with pytest.raises(FitError, match=r"Mutate \(callbacks\[0\]\) changed the state tensor at \['params'\]\['b'\] in place.*Signal\(state="):
        _fit([Mutate()])


def test_eval_state_is_refused_outside_on_validation_start():
    class Wrong(Callback):
        def on_epoch_end(self, ctx):
            return Signal(eval_state=ctx.state)

    with pytest.raises(FitError, match="eval_state=.*outside on_validation_start"):
        _fit([Wrong()])


class Hooks(Callback):
    def __init__(self):
        self.events, self.batches, self.loggers = [], [], None

    def on_train_epoch_start(self, ctx):
        self.events.append(("epoch_start", ctx.epoch, ctx.step))
        self.loggers = ctx.loggers

    def on_validation_start(self, ctx):
        self.events.append(("val_start", ctx.stage, ctx.step))

    def on_validation_batch_end(self, ctx):
        self.batches.append((ctx.stage, {k: float(v) for k, v in ctx.batch_metrics.items()}))

    def on_validation_end(self, ctx):
        self.events.append(("val_end", ctx.stage, ctx.step))

    def on_epoch_end(self, ctx):
        self.events.append(("epoch_end", ctx.epoch, ctx.step))


def test_epoch_start_validation_batch_hooks_and_loggers():
    hooks, logger = Hooks(), MemoryLogger()
    state = _fit([hooks], loggers=[logger], num_sanity_val_steps=1)
    assert hooks.events == [("val_start", "sanity", 0), ("val_end", "sanity", 0),
                            ("epoch_start", 0, 0), ("val_start", "validate", 5), ("val_end", "validate", 5),
                            ("epoch_end", 0, 5),
                            ("epoch_start", 1, 5), ("val_start", "validate", 10), ("val_end", "validate", 10),
                            ("epoch_end", 1, 10)]
    assert list(hooks.loggers) == [logger]
    assert [s for s, _ in hooks.batches] == ["sanity"] + ["validate"] * 8
    # the batch metrics are each batch's own values: their mean (equal batch sizes) is val/loss
    last = [m for _, m in hooks.batches[-4:]]
    assert set(last[0]) == {"val/loss", "val/mae"}
    x, y = _problem()
    expected = [float(_loss(state.params, (x[i:i + 4], y[i:i + 4]))[0]) for i in range(0, 16, 4)]
    assert [m["val/loss"] for m in last] == pytest.approx(expected, rel=1e-6)
    assert sum(m["val/loss"] for m in last) / 4 == pytest.approx(logger.values("val/loss")[-1][1], rel=1e-6)


class Counter(Callback):
    """Bookkeeping that must survive a resume: numbers (inf and non-round floats) and a tensor."""

    def __init__(self):
        self.n, self.total, self.best, self.hist = 0, 0.0, math.inf, torch.zeros(3, dtype=torch.float64)

    def on_train_batch_end(self, ctx):
        self.n += 1
        self.total += 0.1 * ctx.step
        self.hist[ctx.step % 3] += 1.0 / 3.0

    def state_dict(self):
        return {"n": self.n, "total": self.total, "best": self.best, "hist": self.hist, "nested": {"h": self.hist * 2}}

    def load_state_dict(self, state):
        self.n, self.total, self.best, self.hist = state["n"], state["total"], state["best"], state["hist"]
        self.nested = state["nested"]


class SaveHook(Callback):
    def __init__(self):
        self.seen = []

    def on_save_checkpoint(self, ctx, path, checkpoint):
        self.seen.append((path.name, sorted(checkpoint), sorted(checkpoint["callbacks"])))
        return Signal(metadata={"note": f"step {ctx.step}"})


def test_callback_state_with_tensors_is_checkpointed_and_resumed_exactly(tmp_path):
    counter, hook = Counter(), SaveHook()
    _fit([counter, hook, ModelCheckpoint(tmp_path, filename="{step}", every_n_steps=3, save_top_k=-1)], max_epochs=1)
    assert hook.seen[0][0] == "3.safetensors" and "params" in hook.seen[0][1] and "loop" in hook.seen[0][1]
    assert "Counter" in hook.seen[0][2]
    assert lf.read_metadata(tmp_path / "3.safetensors")["metadata"]["note"] == "step 3"
    # a fresh Counter resumed at step 3 holds exactly what the first one held then
    resumed = Counter()
    _fit([resumed, ModelCheckpoint(tmp_path / "r", every_n_steps=100)], max_epochs=1, max_steps=3,
         resume_from=tmp_path / "3.safetensors")
    ref = Counter()
    for s in (1, 2, 3):
        ref.on_train_batch_end(ctx(step=s))
    assert (resumed.n, resumed.total, resumed.best) == (ref.n, ref.total, ref.best) == (3, 0.1 + 0.2 + 0.30000000000000004, math.inf)
    assert resumed.hist.dtype == torch.float64 and torch.equal(resumed.hist, ref.hist)
    assert torch.equal(resumed.nested["h"], ref.hist * 2)


def test_on_save_checkpoint_may_only_add_metadata(tmp_path):
    class Stopper(Callback):
        def on_save_checkpoint(self, ctx, path, checkpoint):
            return Signal(stop=True)

    with pytest.raises(FitError, match="Signal\\(metadata="):
        _fit([Stopper(), ModelCheckpoint(tmp_path)], max_epochs=1)


def test_per_step_hooks_go_only_to_callbacks_that_override_them():
    from lightfn.fit._hooks import overriding

    class Quiet(lf.callbacks.Callback):
        def on_epoch_end(self, ctx):
            return None

    class Counting(lf.callbacks.Callback):
        def on_train_batch_end(self, ctx):
            return None

    class Sub(Counting):
        pass

    cbs = [Quiet(), Counting(), lf.callbacks.Callback(), Sub()]
    assert overriding(cbs, lambda c: c.on_train_batch_end) == (1, 3)
    assert overriding(cbs, lambda c: c.on_epoch_end) == (0,)
    assert overriding(cbs, lambda c: c.on_validation_batch_end) == ()
