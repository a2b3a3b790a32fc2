"""lf.metrics.Sum: metric states summed over an epoch (and ranks), turned into values by
compute_metrics; the F1 and perplexity of a whole dataset, not means of batch values."""

import pytest
import torch
import torch.nn.functional as F

import lightfn as lf
from lightfn.callbacks import EarlyStopping, ModelCheckpoint
from lightfn.distributed.collectives import sum_in_buckets
from lightfn.errors import FitError, StepError
from memory_logger import MemoryLogger

N, D, K, B = 50, 4, 3, 8  # 7 batches, the last one ragged (2 rows)


def data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()  # 3 unbalanced classes
    return x, y


def params(seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(D, K, generator=g) * 0.5, "b": torch.zeros(K)}


def confusion(target, pred):
    """Rows: target, columns: prediction (int64 counts). Not bincount: its output shape
    depends on the data, which a compiled step cannot have."""
    classes = torch.arange(K, device=target.device)
    t, p = target[:, None] == classes, pred[:, None] == classes
    return (t[:, :, None] & p[:, None, :]).sum(0)


def macro_f1(cm):
    cm = cm.double()
    tp = cm.diagonal()
    return (2 * tp / (cm.sum(0) + cm.sum(1)).clamp(min=1)).mean()


def loss_fn(p, batch):
    x, y = batch
    logits = x @ p["w"] + p["b"]
    nll = F.cross_entropy(logits, y, reduction="none")
    # a ragged "token" count per batch: only rows with x[:, 2] > 0 count for perplexity
    mask = x[:, 2] > 0
    ppl = lf.metrics.Sum({"nll": (nll * mask).sum(), "tokens": mask.sum()})
    return nll.mean(), {"acc": (logits.argmax(-1) == y).float().mean(), "confusion": lf.metrics.Sum(confusion(y, logits.argmax(-1))),
                        "ppl": ppl}


def compute(totals):
    return {"f1": macro_f1(totals["confusion"]),
            "ppl": torch.exp(totals["ppl"]["nll"] / totals["ppl"]["tokens"])}


def state(opt=None):
    return lf.TrainState.create(params=params(), optimizer=opt or lf.optim.sgd(0.5), seed=0)


def loader(x, y, **kw):
    return lf.data.ArrayLoader((x, y), batch_size=B, shuffle=False, drop_last=False, **kw)


def _f32(t):
    return float(t.float())  # what fit logs: one float32 transfer (runner.to_host)


def test_validate_f1_and_perplexity_cover_the_whole_dataset_not_batch_means():
    x, y = data()
    s = state()
    out = lf.validate(lf.eval_step(loss_fn), s, loader(x, y), compute_metrics=compute)
    assert sorted(out) == ["val/acc", "val/f1", "val/loss", "val/ppl"]

    logits = x @ s.params["w"] + s.params["b"]
    pred = logits.argmax(-1)
    # F1 of the confusion matrix of all 50 rows at once
    assert out["val/f1"] == _f32(macro_f1(confusion(y, pred)))
    batch_f1s = [macro_f1(confusion(y[i:i + B], pred[i:i + B])) for i in range(0, N, B)]
    assert abs(out["val/f1"] - float(torch.stack(batch_f1s).mean())) > 1e-3  # the mean of batch F1s is another number
    # perplexity: exp(sum of NLL / sum of tokens), summed batch by batch in float32 as the step does
    nll_sum, tokens = torch.zeros(()), torch.zeros((), dtype=torch.int64)
    for i in range(0, N, B):
        xb, yb = x[i:i + B], y[i:i + B]
        mask = xb[:, 2] > 0
        nll_sum = nll_sum + (F.cross_entropy(xb @ s.params["w"] + s.params["b"], yb, reduction="none") * mask).sum()
        tokens = tokens + mask.sum()
    assert int(tokens) == int((x[:, 2] > 0).sum())
    assert out["val/ppl"] == _f32(torch.exp(nll_sum / tokens))
    # the averaged metrics are unchanged: row-weighted means over the ragged last batch
    nll = F.cross_entropy(logits, y, reduction="none")
    assert out["val/loss"] == pytest.approx(float(nll.mean()), rel=1e-6)
    assert out["val/acc"] == pytest.approx(float((pred == y).float().mean()), rel=1e-6)


def test_a_scalar_state_without_compute_metrics_logs_its_total():
    x, y = data()

    def count_fn(p, batch):
        loss = F.cross_entropy(batch[0] @ p["w"] + p["b"], batch[1])
        return loss, {"rows": lf.metrics.Sum(torch.tensor(batch[0].shape[0])), "pos": lf.metrics.Sum((batch[1] == 2).sum())}

    out = lf.test(lf.eval_step(count_fn), state(), loader(x, y))
    assert out["test/rows"] == N and out["test/pos"] == int((y == 2).sum())


def test_fit_logs_epoch_values_and_checkpoints_and_early_stopping_monitor_them(tmp_path):
    x, y = data()
    vx, vy = data(30, seed=2)
    logger = MemoryLogger()
    ckpt = ModelCheckpoint(tmp_path, monitor="val/f1", mode="max", save_top_k=1)
    stop = EarlyStopping(monitor="val/ppl", mode="min", patience=100)
    opt = lf.optim.sgd(0.5)
    out = lf.fit(lf.train_step(loss_fn, opt), state(opt), loader(x, y), val_data=loader(vx, vy),
                 eval_step=lf.eval_step(loss_fn), compute_metrics=compute, max_epochs=3, jit=False, progress=False,
                 loggers=[logger], callbacks=[ckpt, stop], num_sanity_val_steps=0, log_every_n_steps=1)
    names = set().union(*(m for _, m in logger.rows))
    assert {"train/f1_epoch", "train/ppl_epoch", "train/loss_epoch", "train/acc_epoch", "val/f1", "val/ppl"} <= names
    assert not any(n.startswith("train/confusion") or n == "train/f1" or n == "train/ppl" for n in names)  # states are not logged per step
    f1s = logger.values("val/f1")
    assert len(f1s) == 3
    best = max(v for _, v in f1s)
    assert ckpt.best_model_score == best
    assert stop.best_score == min(v for _, v in logger.values("val/ppl"))
    # the last validation is the final state's, through lf.validate: the same pass
    again = lf.validate(lf.eval_step(loss_fn), out, loader(vx, vy), compute_metrics=compute)
    assert again["val/f1"] == f1s[-1][1] and again["val/ppl"] == logger.values("val/ppl")[-1][1]


def test_train_epoch_values_are_of_the_summed_states_over_the_epoch():
    x, y = data()
    s = state(lf.optim.sgd(0.0))  # params never change: the epoch's states are those of fixed params
    logger = MemoryLogger()
    lf.fit(lf.train_step(loss_fn, lf.optim.sgd(0.0)), s, loader(x, y), compute_metrics=compute, max_epochs=1,
           jit=False, progress=False, loggers=[logger])
    ref = lf.validate(lf.eval_step(loss_fn), s, loader(x, y), compute_metrics=compute)
    assert logger.values("train/f1_epoch") == [(7, ref["val/f1"])]
    assert logger.values("train/ppl_epoch") == [(7, ref["val/ppl"])]


def test_resume_mid_epoch_carries_the_summed_states_exactly(tmp_path):
    x, y = data(200)
    opt = lf.optim.adam(0.05)
    train = lf.data.ArrayLoader((x, y), batch_size=B, shuffle=True, seed=4)  # 25 batches per epoch

    def go(dirpath, max_steps, **kw):
        logger = MemoryLogger()
        out = lf.fit(lf.train_step(loss_fn, opt), state(opt), train, compute_metrics=compute, max_steps=max_steps,
                     jit=False, progress=False, loggers=[logger],
                     callbacks=[ModelCheckpoint(dirpath, every_n_steps=4, save_top_k=1)], **kw)
        return out, logger

    ref, ref_log = go(tmp_path / "ref", 40)
    go(tmp_path / "cut", 10)  # the last step checkpoint: step 8, mid-epoch 0
    loop = lf.load(tmp_path / "cut" / "epoch=0-step=8.safetensors", subtree="loop")
    assert loop["step"] == 8 and loop["sums"]["confusion"].dtype == torch.int64
    assert int(loop["sums"]["confusion"].sum()) == 8 * B  # 8 batches' rows, none of the epoch's rest
    resumed, log = go(tmp_path / "cut", 40, resume_from=tmp_path / "cut" / "epoch=0-step=8.safetensors")
    assert torch.equal(resumed.params["w"], ref.params["w"])
    for name in ("train/f1_epoch", "train/ppl_epoch", "train/loss_epoch"):
        assert log.values(name) == ref_log.values(name) and [s for s, _ in log.values(name)] == [25, 40], name


def test_resume_with_other_states_is_refused(tmp_path):
    x, y = data()
    opt = lf.optim.sgd(0.1)

    def other_fn(p, batch):
        loss, m = loss_fn(p, batch)
        return loss, {**m, "confusion": lf.metrics.Sum(m["confusion"].value[:2])}  # another shape

    lf.fit(lf.train_step(loss_fn, opt), state(opt), loader(x, y), compute_metrics=compute, max_steps=3, jit=False,
           progress=False, callbacks=[ModelCheckpoint(tmp_path, every_n_steps=2)])
    with pytest.raises(StepError, match=r"(?s)summed metric states.*'confusion'.*resume with the step"):
        lf.fit(lf.train_step(other_fn, opt), state(opt), loader(x, y), compute_metrics=compute, max_steps=6,
               jit=False, progress=False, resume_from=tmp_path / "last.safetensors")


def test_mistakes_are_named():
    x, y = data()

    def matrix_fn(p, batch):
        loss = F.cross_entropy(batch[0] @ p["w"] + p["b"], batch[1])
        return loss, {"confusion": lf.metrics.Sum(torch.ones(K, K))}

    with pytest.raises(FitError, match=r"'confusion' is a Sum of .*\(3, 3\).*compute_metrics=fn"):
        lf.validate(lf.eval_step(matrix_fn), state(), loader(x, y))
    with pytest.raises(FitError, match="'loss', which is also a metric the step averages"):
        lf.validate(lf.eval_step(matrix_fn), state(), loader(x, y), compute_metrics=lambda t: {"loss": t["confusion"].sum()})
    with pytest.raises(FitError, match="each value must be a real scalar"):
        lf.validate(lf.eval_step(matrix_fn), state(), loader(x, y), compute_metrics=lambda t: {"m": t["confusion"]})
    with pytest.raises(StepError, match=r"metric 'bad'\['n'\] of the loss_fn is .*float.*torch.tensor"):
        lf.validate(lf.eval_step(lambda p, b: (matrix_fn(p, b)[0], {"bad": lf.metrics.Sum({"n": 1.0})})), state(), loader(x, y))


def test_a_dp_step_sums_the_states_of_its_real_rows():
    # DP-SGD runs loss_fn row by row: a Sum state is summed over the rows (padding rows out),
    # the averaged metrics stay row means
    x, y = data()
    opt = lf.optim.sgd(0.1)
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=0.0)
    keep = torch.tensor([True, False, True, True, False, True, True, True])
    _, m = step(state(opt), lf.data.MaskedBatch(data=(x[:B], y[:B]), mask=keep))
    s = state(opt)
    logits = x[:B][keep] @ s.params["w"] + s.params["b"]
    assert torch.equal(m["confusion"].value, confusion(y[:B][keep], logits.argmax(-1)))
    assert int(m["ppl"].value["tokens"]) == int((x[:B][keep][:, 2] > 0).sum())
    assert float(m["acc"]) == pytest.approx(float((logits.argmax(-1) == y[:B][keep]).float().mean()))


def test_sum_in_buckets_sums_every_leaf_over_ranks_in_its_own_dtype():
    # two simulated ranks: rank 1's flat buckets are recorded, then added into rank 0's
    big = 2**40 + 1  # beyond float32 (and float64 of a float32 bucket) precision: int64 must stay int64
    rank0 = {"mean": torch.tensor([1.5, 2.0, 8.0]), "sum": {"cm": torch.tensor([[big, 1], [2, 3]]),
             "half": torch.tensor([0.5, 1.0], dtype=torch.bfloat16), "nll": torch.tensor(3.25, dtype=torch.float64)}}
    rank1 = {"mean": torch.tensor([0.5, 1.0, 2.0]), "sum": {"cm": torch.tensor([[1, 0], [0, big]]),
             "half": torch.tensor([0.25, 2.0], dtype=torch.bfloat16), "nll": torch.tensor(1.0, dtype=torch.float64)}}
    buckets = []
    sum_in_buckets(rank1, buckets.append, upcast_bf16=True)
    before = lf.tree.map(torch.clone, rank0)
    out = sum_in_buckets(rank0, lambda flat: flat.add_(buckets.pop(0)), upcast_bf16=True)
    assert not buckets and any(b is not None for b in [out])
    expected = lf.tree.map(lambda a, b: a + b, before, rank1)
    for (path, got), (_, want) in zip(lf.tree.leaves_with_path(out), lf.tree.leaves_with_path(expected)):
        assert got.dtype == want.dtype and torch.equal(got, want), lf.tree.keystr(path)
    assert int(out["sum"]["cm"][0, 0]) == big + 1 and int(out["sum"]["cm"][1, 1]) == big + 3
    for (_, a), (_, b) in zip(lf.tree.leaves_with_path(rank0), lf.tree.leaves_with_path(before)):
        assert torch.equal(a, b)  # the inputs are not modified


@pytest.mark.compile
def test_compiled_fit_and_validate_sum_states_like_eager():
    x, y = data()
    vx, vy = data(30, seed=2)
    runs = []
    for jit in (False, True):
        logger = MemoryLogger()
        opt = lf.optim.sgd(0.5)
        out = lf.fit(lf.train_step(loss_fn, opt), state(opt), loader(x, y), val_data=loader(vx, vy),
                     eval_step=lf.eval_step(loss_fn), compute_metrics=compute, max_epochs=2, jit=jit, progress=False,
                     loggers=[logger], num_sanity_val_steps=0)
        runs.append((out, logger))
    (eager, eager_log), (compiled, compiled_log) = runs
    for name in ("train/f1_epoch", "val/f1"):
        assert compiled_log.values(name) == eager_log.values(name), name
    for name in ("train/ppl_epoch", "val/ppl"):
        assert [s for s, _ in compiled_log.values(name)] == [s for s, _ in eager_log.values(name)]
        for (_, a), (_, b) in zip(compiled_log.values(name), eager_log.values(name)):
            assert a == pytest.approx(b, rel=1e-5), name
