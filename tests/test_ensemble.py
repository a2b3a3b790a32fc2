"""lf.ensemble: K members in one vmapped step equal K separate runs (float64, plain torch)."""

import pytest
import torch

import lightfn as lf
from memory_logger import MemoryLogger

D = torch.float64


def loss_fn(p, batch):
    x, y = batch
    h = torch.nn.functional.dropout(torch.tanh(x @ p["w1"] + p["b1"]), 0.3)
    err = h @ p["w2"] - y
    return (err**2).mean(), {"mae": err.abs().mean()}


def member(seed, opt, *, param_seed=None):
    g = torch.Generator().manual_seed(seed if param_seed is None else param_seed)
    params = {
        "w1": torch.randn(4, 8, generator=g, dtype=D),
        "b1": torch.zeros(8, dtype=D),
        "w2": torch.randn(8, 1, generator=g, dtype=D) / 3,
    }
    return lf.TrainState.create(params=params, optimizer=opt, seed=seed)


def data(n=16, seed=0):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, 4, generator=g, dtype=D)
    return x, torch.sin(x.sum(1, keepdim=True))


def assert_trees_close(a, b, rtol=1e-9):
    for (path, x), y in zip(lf.tree.leaves_with_path(a), lf.tree.leaves(b)):
        assert x.dtype == y.dtype, lf.tree.keystr(path)
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * 1e-3, msg=lambda m: f"{lf.tree.keystr(path)}: {m}")


def test_member_i_of_an_ensemble_equals_member_i_trained_alone_with_dropout():
    opt = lf.optim.adam(1e-2)
    step = lf.train_step(loss_fn, opt)
    members = [member(s, opt) for s in range(3)]
    batches = [data(seed=i) for i in range(5)]
    state = lf.tree.stack(members)
    ens = lf.ensemble(step)
    for b in batches:
        state, metrics = ens(state, b)
    assert metrics["loss"].shape == (3,) and metrics["mae"].shape == (3,)
    for i, alone in enumerate(members):
        for b in batches:
            alone, m = step(alone, b)
        assert_trees_close(alone, lf.tree.unstack(state)[i])
        torch.testing.assert_close(metrics["loss"][i], m["loss"], rtol=1e-9, atol=0)


def test_members_draw_from_their_own_keys():
    opt = lf.optim.sgd(0.1)
    step = lf.ensemble(lf.train_step(loss_fn, opt))
    # Same params; seeds 0, 0, 1: equal seeds give equal dropout masks, a different seed does not.
    state = lf.tree.stack([member(0, opt, param_seed=7), member(0, opt, param_seed=7), member(1, opt, param_seed=7)])
    state, metrics = step(state, data())
    assert metrics["loss"][0] == metrics["loss"][1]
    assert metrics["loss"][0] != metrics["loss"][2]
    w = state.params["w1"]
    assert torch.equal(w[0], w[1]) and not torch.allclose(w[0], w[2])


def test_batch_axis_0_gives_each_member_its_own_slice():
    opt = lf.optim.sgd(0.05, momentum=0.9)
    step = lf.train_step(loss_fn, opt)
    members = [member(s, opt) for s in range(2)]
    per_member = [data(seed=10 + i) for i in range(2)]
    stacked_batch = lf.tree.stack(per_member)
    state, _ = lf.ensemble(step, batch_axis=0)(lf.tree.stack(members), stacked_batch)
    for i, alone in enumerate(members):
        alone, _ = step(alone, per_member[i])
        assert_trees_close(alone, lf.tree.unstack(state)[i])


def test_eval_step_and_hand_written_step_with_shared_non_tensor_state():
    opt = lf.optim.sgd(0.1)
    members = [member(s, opt) for s in range(3)]
    evaluate = lf.eval_step(loss_fn)
    out = lf.ensemble(evaluate)(lf.tree.stack(members), data())
    for i, m in enumerate(members):
        torch.testing.assert_close(out["loss"][i], evaluate(m, data())["loss"], rtol=1e-12, atol=0)

    def step(state, batch):  # plain torch, no lightfn step: w <- w - lr * x.mean()
        w = state["w"] - state["lr"] * batch.mean()
        return {"w": w, "lr": state["lr"], "tag": state["tag"]}, {"w": w.sum()}

    states = [{"w": torch.full((2,), float(i), dtype=D), "lr": 0.5, "tag": "x"} for i in range(3)]
    new, metrics = lf.ensemble(step)(lf.tree.stack(states), torch.ones(4, dtype=D))
    assert new["tag"] == "x" and new["lr"] == 0.5
    assert new["w"].tolist() == [[-0.5, -0.5], [0.5, 0.5], [1.5, 1.5]]
    assert metrics["w"].tolist() == [-1.0, 1.0, 3.0]


def test_errors_are_actionable():
    opt = lf.optim.sgd(0.1)
    step = lf.train_step(loss_fn, opt)
    with pytest.raises(lf.StepError, match="0-d tensor.*lf.tree.stack"):
        lf.ensemble(step)(member(0, opt), data())
    with pytest.raises(lf.StepError, match=r"batch\[0\] has shape \(16, 4\); with 2 members"):
        lf.ensemble(step, batch_axis=0)(lf.tree.stack([member(0, opt), member(1, opt)]), data())
    with pytest.raises(lf.StepError, match=r"lf.jit\(lf.ensemble\(step\)\)"):
        lf.ensemble(lf.jit(step))
    with pytest.raises(lf.StepError, match="batch_axis"):
        lf.ensemble(step, batch_axis=1)


@pytest.mark.compile
def test_compiled_ensemble_is_one_graph_and_matches_eager():
    opt = lf.optim.adam(1e-2)
    step = lf.ensemble(lf.train_step(loss_fn, opt))
    members = [member(s, opt) for s in range(4)]
    compiled = lf.jit(step)
    a = b = lf.tree.stack(members)
    for i in range(3):
        a, ma = step(a, data(seed=i))
        b, mb = compiled(b, data(seed=i))
    assert_trees_close(a, b, rtol=1e-9)
    torch.testing.assert_close(ma["loss"], mb["loss"], rtol=1e-9, atol=0)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]



# ----------------------------------------------------------------------------- lf.fit


def fit_data(n=30, seed=0):
    """30 rows in batches of 8: the last batch is ragged (6 rows), so row weighting shows."""
    return data(n=n, seed=seed)


def batches_of(x, y, size=8):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


def test_fit_trains_an_ensemble_and_logs_mean_and_members():
    opt = lf.optim.sgd(0.05)
    step = lf.train_step(loss_fn, opt)
    members = [member(s, opt) for s in range(2)]
    x, y = fit_data()
    vx, vy = data(n=13, seed=5)
    logger = MemoryLogger()
    seen = {}

    class Grab(lf.callbacks.Callback):
        def on_epoch_end(self, ctx):
            seen.update(ctx.metrics)

    state = lf.fit(lf.ensemble(step), lf.tree.stack(members), lf.data.ArrayLoader((x, y), batch_size=8, shuffle=False, drop_last=False),
                   val_data=lf.data.ArrayLoader((vx, vy), batch_size=5, shuffle=False, drop_last=False),
                   eval_step=lf.ensemble(lf.eval_step(loss_fn)), num_sanity_val_steps=0,
                   max_epochs=1, jit=False, callbacks=[Grab()], loggers=[logger], log_every_n_steps=1, progress=False)
    evaluate = lf.eval_step(loss_fn)
    for i, alone in enumerate(members):
        losses, rows = [], []
        for b in batches_of(x, y):
            alone, m = step(alone, b)
            losses.append(float(m["loss"]))
            rows.append(len(b[0]))
        assert_trees_close(alone, lf.tree.unstack(state)[i])
        # logged values pass through float32 (one host transfer), hence rel=1e-6
        assert seen[f"train/loss/member_{i}"] == pytest.approx(losses[-1], rel=1e-6)
        epoch_mean = sum(l * r for l, r in zip(losses, rows)) / sum(rows)
        assert seen[f"train/loss_epoch/member_{i}"] == pytest.approx(epoch_mean, rel=1e-6)
        val = [(float(evaluate(alone, b)["loss"]), len(b[0])) for b in batches_of(vx, vy, 5)]
        assert seen[f"val/loss/member_{i}"] == pytest.approx(sum(l * r for l, r in val) / len(vx), rel=1e-6)
    for name in ("train/loss", "train/loss_epoch", "train/mae_epoch", "val/loss", "val/mae"):
        assert seen[name] == pytest.approx((seen[f"{name}/member_0"] + seen[f"{name}/member_1"]) / 2, rel=1e-6)
    assert "lr" in seen and "lr/member_0" not in seen  # one rate shared by the members
    assert [s for s, _ in logger.values("train/loss/member_1")] == [1, 2, 3, 4]


def test_member_i_of_an_ensemble_fit_equals_member_i_fit_alone():
    opt = lf.optim.adam(1e-2)
    step = lf.train_step(loss_fn, opt)
    members = [member(s, opt) for s in range(3)]
    x, y = fit_data()
    vx, vy = data(n=11, seed=5)

    def run(step, eval_step, state):
        logger = MemoryLogger()
        out = lf.fit(step, state, lf.data.ArrayLoader((x, y), batch_size=8, drop_last=False, seed=3),
                     val_data=lf.data.ArrayLoader((vx, vy), batch_size=4, shuffle=False, drop_last=False), eval_step=eval_step,
                     max_epochs=3, jit=False, loggers=[logger], log_every_n_steps=2, progress=False)
        return out, logger

    ens, ens_log = run(lf.ensemble(step), lf.ensemble(lf.eval_step(loss_fn)), lf.tree.stack(members))
    for i, m in enumerate(members):
        alone, log = run(step, lf.eval_step(loss_fn), m)
        assert_trees_close(alone, lf.tree.unstack(ens)[i], rtol=1e-9)
        for name in ("val/loss", "train/loss_epoch", "train/mae"):
            assert [s for s, _ in ens_log.values(f"{name}/member_{i}")] == [s for s, _ in log.values(name)]
            for (_, a), (_, b) in zip(ens_log.values(f"{name}/member_{i}"), log.values(name)):
                assert a == pytest.approx(b, rel=1e-6), name


def test_lr_sweep_logs_mean_and_member_rates_and_callbacks_monitor_members(tmp_path):
    make = lf.optim.inject_hyperparams(lf.optim.sgd)
    rates = [0.2, 0.05, 0.01]
    members = [member(0, make(lr=lr)) for lr in rates]
    x, y = fit_data()
    step = lf.train_step(loss_fn, make(lr=0.1))  # the rate comes from each member's state
    ckpt = lf.callbacks.ModelCheckpoint(tmp_path, monitor="val/loss/member_2", save_top_k=1)
    stopper = lf.callbacks.EarlyStopping(monitor="val/loss", patience=100)
    monitor = lf.callbacks.LearningRateMonitor(log_every_n_steps=2)
    logger = MemoryLogger()
    state = lf.fit(lf.ensemble(step), lf.tree.stack(members), lf.data.ArrayLoader((x, y), batch_size=8, drop_last=False, seed=1),
                   val_data=[(x, y)], eval_step=lf.ensemble(lf.eval_step(loss_fn)), max_epochs=2, jit=False,
                   callbacks=[ckpt, stopper, monitor], loggers=[logger], log_every_n_steps=2, progress=False)
    by_step = logger.by_step()
    assert {k: by_step[2][k] for k in ("lr", "lr/member_0", "lr/member_1", "lr/member_2")} == pytest.approx(
        {"lr": sum(rates) / 3, "lr/member_0": 0.2, "lr/member_1": 0.05, "lr/member_2": 0.01}, rel=1e-12)
    for i, lr in enumerate(rates):  # each member trained with its own rate
        alone = member(0, make(lr=lr))
        for b in (b for e in range(2) for b in lf.data.ArrayLoader((x, y), batch_size=8, drop_last=False, seed=1).iter_epoch(e)):
            alone, _ = step(alone, b)
        assert_trees_close(alone, lf.tree.unstack(state)[i])
    vals = [m for _, m in logger.rows if "val/loss/member_2" in m]
    assert ckpt.best_model_score == pytest.approx(min(m["val/loss/member_2"] for m in vals), rel=1e-6)
    assert stopper.best_score == pytest.approx(min(m["val/loss"] for m in vals), rel=1e-6)
    saved = lf.load(ckpt.best_model_path)
    assert saved["params"]["w1"].shape == (3, 4, 8)  # the stacked state


def test_an_interrupted_ensemble_fit_resumes_exactly(tmp_path):
    opt = lf.optim.adam(1e-2)
    members = [member(s, opt) for s in range(3)]
    x, y = fit_data()

    def run(dirpath, **kw):
        logger = MemoryLogger()
        out = lf.fit(lf.ensemble(lf.train_step(loss_fn, opt)), lf.tree.stack(members),
                     lf.data.ArrayLoader((x, y), batch_size=8, drop_last=False, seed=4), val_data=[(x, y)],
                     eval_step=lf.ensemble(lf.eval_step(loss_fn)), max_epochs=3, jit=False, log_every_n_steps=1,
                     callbacks=[lf.callbacks.ModelCheckpoint(dirpath, every_n_steps=3, save_top_k=-1)],
                     loggers=[logger], progress=False, **kw)
        return out, logger.by_step()

    reference, ref_logs = run(tmp_path / "ref")
    # 4 batches per epoch: max_steps=7 stops mid-epoch 1; its step-6 file is mid-epoch too
    run(tmp_path / "cut", max_steps=7)
    resumed, logs = run(tmp_path / "cut", resume_from=tmp_path / "cut" / "epoch=1-step=6.safetensors")
    for (path, a), b in zip(lf.tree.leaves_with_path(resumed), lf.tree.leaves(reference)):
        assert torch.equal(a, b), lf.tree.keystr(path)
    for s, metrics in logs.items():
        assert metrics == {k: ref_logs[s][k] for k in metrics}, s
    assert "train/loss_epoch/member_2" in logs[12]


@pytest.mark.compile
def test_compiled_ensemble_fit_matches_eager():
    opt = lf.optim.adam(1e-2)
    members = [member(s, opt) for s in range(3)]
    x, y = fit_data()

    def run(jit):
        seen = {}

        class Grab(lf.callbacks.Callback):
            def on_epoch_end(self, ctx):
                seen.update(ctx.metrics)

        state = lf.fit(lf.ensemble(lf.train_step(loss_fn, opt)), lf.tree.stack(members),
                       lf.data.ArrayLoader((x, y), batch_size=8, drop_last=False, seed=2), val_data=[(x, y)],
                       eval_step=lf.ensemble(lf.eval_step(loss_fn)), max_epochs=2, jit=jit, callbacks=[Grab()],
                       log_every_n_steps=1, progress=False)
        return state, seen

    (eager, m_eager), (compiled, m_compiled) = run(False), run(True)
    assert_trees_close(compiled, eager, rtol=1e-9)
    assert m_compiled.keys() == m_eager.keys() and "val/loss/member_2" in m_compiled
    assert m_compiled == pytest.approx(m_eager, rel=1e-6)
