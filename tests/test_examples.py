"""The examples run end to end on small settings and do what they say.

Each example is called in-process through its ``main(argv)`` (eager, a few dozen steps,
output in a temporary folder); the main job also runs once compiled, with the command
line ``scripts/run.sh`` uses. The assertions read what the runs leave behind:
metrics.csv, TensorBoard events, safetensors checkpoints, PNG files.
"""

from __future__ import annotations

import csv
import gzip
import math
import pathlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import lightfn as lf

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their helpers as top-level modules

import _data  # noqa: E402
import autoencoder  # noqa: E402
import custom_loop  # noqa: E402
import dp_mnist  # noqa: E402
import ensemble  # noqa: E402
import export  # noqa: E402
import gan  # noqa: E402
import maml_sine  # noqa: E402
import mnist_classifier  # noqa: E402
import transformer_lm  # noqa: E402

sys.path.remove(str(EXAMPLES))
EAGER = ["--no-jit", "--no-download"]


@pytest.fixture(autouse=True)
def _restore_threads():
    # The examples set torch's thread count (--threads, default 1); other tests keep theirs.
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _rows(path: pathlib.Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(r[name]) for r in rows if r.get(name)]


def _write_idx(path: pathlib.Path, array: np.ndarray, *, gz: bool) -> None:
    magic = {1: 0x0801, 3: 0x0803}[array.ndim]
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape) + array.astype(np.uint8).tobytes()
    (path.with_name(path.name + ".gz") if gz else path).write_bytes(gzip.compress(raw) if gz else raw)


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("gz", [False, True])
def test_idx_files_are_read_and_split(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    labels = (np.arange(50) % 10).astype(np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels, gz=gz)
    suffix = ".gz" if gz else ""
    assert np.array_equal(_data.read_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}"), images)

    digits = _data.load_mnist(tmp_path, download=False, seed=3)
    assert digits.source.startswith("MNIST test set")
    assert (len(digits.train_images), len(digits.val_images)) == (45, 5)  # 90/10 for a small file
    assert digits.train_images.shape[1:] == (1, 28, 28) and digits.train_images.dtype == torch.float32
    # every image comes back once, scaled to [0, 1], with its own label
    x = torch.cat([digits.train_images, digits.val_images]).squeeze(1)
    y = torch.cat([digits.train_labels, digits.val_labels])
    got = sorted((int(label), (img * 255).round().to(torch.uint8).numpy().tobytes()) for img, label in zip(x, y))
    assert got == sorted((int(label), img.tobytes()) for img, label in zip(images, labels))


def test_idx_reader_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes((0x0803).to_bytes(4, "big") + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\0" * 100)
    with pytest.raises(ValueError, match="header says"):
        _data.read_idx(bad)
    bad.write_bytes(b"\x12\x34\x56\x78" + b"\0" * 16)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        _data.read_idx(bad)


def test_sklearn_fallback_says_so_in_one_line(tmp_path, capsys):
    digits = _data.load_mnist(tmp_path / "empty", download=False)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "falling back" in lines[0] and "scikit-learn" in lines[0] and "download disabled" in lines[0]
    assert len(digits.train_images) + len(digits.val_images) == 1797
    assert digits.train_images.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(digits.train_images.min()) and float(digits.train_images.max()) <= 1.0
    assert set(digits.train_labels.tolist()) == set(range(10))
    assert not (tmp_path / "empty").exists()  # nothing created on the way


# ---------------------------------------------------------------------------- examples, eager


def test_autoencoder_trains_logs_checkpoints_and_exports(tmp_path, mnist_dir, capsys):
    out = tmp_path / "ae"
    argv = ["--data-dir", str(mnist_dir), "--out", str(out), "--max-epochs", "2", "--limit-train-batches", "40", *EAGER]
    assert autoencoder.main(argv) == 0
    printed = capsys.readouterr().out
    run = out / "version_0"

    rows = _rows(run / "metrics.csv")
    val = _column(rows, "val/loss")
    train = _column(rows, "train/loss_epoch")
    assert len(val) == len(train) == 2 and val[1] < val[0] and train[1] < train[0]
    assert max(int(r["step"]) for r in rows) == 80
    assert "epoch 2/2  step 80" in printed and "encoder alone" in printed

    ckpts = sorted(p.name for p in (run / "checkpoints").glob("*.safetensors"))
    assert "last.safetensors" in ckpts and any(n.startswith("epoch=1-step=80") for n in ckpts)
    params = lf.load(run / "checkpoints" / "last.safetensors")["params"]
    assert params["encoder"]["0.weight"].shape == (64, 784) and params["decoder"]["2.weight"].shape == (784, 64)

    with Image.open(run / "reconstructions.png") as png:
        assert png.size == (8 * 30 + 2, 2 * 30 + 2)  # 8 inputs over their 8 reconstructions

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"] == ["val/reconstructions"]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx(val, rel=1e-6)

    # examples/export.py deploys that checkpoint's encoder (torch.export and ONNX; AOT skipped here)
    exported = tmp_path / "exported"
    code = export.main(["--ckpt", str(run / "checkpoints" / "last.safetensors"), "--data-dir", str(mnist_dir),
                        "--out-dir", str(exported), "--skip-aot", "--repeats", "2"])
    assert code == 0  # non-zero when an export differs from eager by more than 1e-4
    assert (exported / "encoder_program.pt2").is_file() and (exported / "encoder.onnx").is_file()


def test_classifier_learns_with_batchnorm_buffers(tmp_path, mnist_dir, capsys):
    out = tmp_path / "clf"
    argv = ["--data-dir", str(mnist_dir), "--out", str(out), "--max-epochs", "2", "--limit-train-batches", "12",
            "--batch-size", "64", *EAGER]
    assert mnist_classifier.main(argv) == 0
    printed = capsys.readouterr().out
    run = out / "version_0"
    rows = _rows(run / "metrics.csv")
    acc = _column(rows, "val/acc")
    assert len(acc) == 2 and acc[-1] > 0.6  # chance is 0.1
    train_loss = _column(rows, "train/loss_epoch")
    assert len(train_loss) == 2 and train_loss[1] < train_loss[0]
    assert "val accuracy" in printed

    (best,) = (run / "checkpoints").glob("epoch=*.safetensors")
    state = lf.load(best)
    buffers = state["buffers"]
    # the running statistics were updated by the 24 training steps, as explicit state
    assert int(buffers["1.num_batches_tracked"]) == int(state["step"]) == 24
    assert float(buffers["1.running_mean"].abs().sum()) > 0 and not torch.allclose(buffers["5.running_var"], torch.ones(32))


def test_gan_two_optimizers_in_one_step(tmp_path, capsys):
    # no MNIST here: the sklearn digits fallback, announced once
    out = tmp_path / "gan"
    argv = ["--data-dir", str(tmp_path / "none"), "--out", str(out), "--max-steps", "150", *EAGER]
    assert gan.main(argv) == 0
    printed = capsys.readouterr().out
    assert sum("falling back" in line for line in printed.splitlines()) == 1
    run = out / "version_0"

    rows = _rows(run / "metrics.csv")
    for name in ("d_loss", "g_loss", "d_real", "d_fake"):
        values = _column(rows, f"train/{name}")
        assert values and all(math.isfinite(v) for v in values)
    with Image.open(run / "samples.png") as png:
        assert png.size == (8 * 30 + 2, 8 * 30 + 2)

    state = lf.load(run / "checkpoints" / "last.safetensors")
    assert int(state["step"]) == 150
    # one Adam state per network, each advanced once per step
    assert set(state["opt_state"]) == {"generator", "discriminator"}
    counts = [int(v) for path, v in lf.tree.leaves_with_path(state["opt_state"]) if v.dtype == torch.int64]
    assert counts and all(c == 150 for c in counts)

    # the trained generator's average digit is much closer to the data's than an untrained one's
    digits = _data.load_mnist(tmp_path / "none", download=False)
    generate, init_params = lf.functionalize(gan.generator())
    z = lf.random.normal(lf.random.key(1), (256, gan.LATENT))

    def gap(params):
        with torch.no_grad():
            images = (generate(params, z) + 1) / 2
        return (images.mean(0) - digits.train_images.flatten(1).mean(0)).abs().mean().item()

    assert gap(state["params"]["generator"]) < 0.7 * gap(init_params)


def test_custom_loop_without_fit_matches_fit(tmp_path, mnist_dir, capsys):
    limits = ["--data-dir", str(mnist_dir), "--max-epochs", "2", "--limit-train-batches", "30", *EAGER]
    assert custom_loop.main([*limits, "--out", str(tmp_path / "loop"), "--log-every", "10"]) == 0
    assert "restores the state exactly: True" in capsys.readouterr().out
    run = tmp_path / "loop" / "version_0"
    rows = _rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [10, 20, 30, 40, 50, 60]
    val = _column(rows, "val/loss")
    assert len(val) == 2 and val[1] < val[0]
    ckpt = run / "checkpoints" / "last.safetensors"
    assert lf.read_metadata(ckpt)["metadata"] == {"epoch": 1, "step": 60, "val/loss": val[1]}
    # the checkpoint restores into a TrainState, ready to continue
    torch.manual_seed(0)
    template = lf.TrainState.create(params=autoencoder.autoencoder().params, optimizer=lf.optim.adam(1e-3))
    state = lf.load(ckpt, like=template)
    assert isinstance(state, lf.TrainState) and int(state.step) == 60

    # the same seed and settings through fit: the same batches, the same numbers
    assert autoencoder.main([*limits, "--out", str(tmp_path / "fit")]) == 0
    fit_rows = _rows(tmp_path / "fit" / "version_0" / "metrics.csv")
    assert _column(fit_rows, "val/loss") == pytest.approx(val, rel=1e-5)
    assert _column(fit_rows, "train/loss_epoch") == pytest.approx(_column(rows, "train/loss_epoch"), rel=1e-5)
    fit_params = lf.load(tmp_path / "fit" / "version_0" / "checkpoints" / "last.safetensors")["params"]
    for a, b in zip(lf.tree.leaves(fit_params), lf.tree.leaves(state.params)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_ensemble_lr_sweep_trains_every_rate_and_picks_the_best(tmp_path, mnist_dir, capsys):
    out = tmp_path / "sweep"
    lrs = [1e-5, 1e-3, 1e-2]
    argv = ["--data-dir", str(mnist_dir), "--out", str(out), "--max-epochs", "2", "--limit-train-batches", "8",
            "--lrs", ",".join(map(str, lrs)), *EAGER]
    assert ensemble.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(out / "version_0" / "metrics.csv")
    assert max(int(r["step"]) for r in rows) == 16
    # each member trained with its own rate, logged as the mean and per member
    assert _column(rows, "lr/member_1")[-1] == pytest.approx(1e-3, rel=1e-6)
    assert _column(rows, "lr")[-1] == pytest.approx(sum(lrs) / 3, rel=1e-6)
    final = [_column(rows, f"val/loss/member_{i}")[-1] for i in range(3)]
    assert _column(rows, "val/loss")[-1] == pytest.approx(sum(final) / 3, rel=1e-5)
    assert final[0] > final[1] and final[0] > 2.0  # 1e-5 barely moves in 16 steps; 1e-3 learns
    # the printed table is a fresh evaluation of the whole validation set: the last logged values
    for lr, loss in zip(lrs, final):
        line = next(ln for ln in printed.splitlines() if ln.split() and ln.split()[0] == f"{lr:.0e}")
        assert float(line.split()[1]) == pytest.approx(loss, abs=1e-4)
    best = min(range(3), key=final.__getitem__)
    assert f"best lr {lrs[best]:g} (member {best})" in printed


def test_transformer_lm_perplexity_is_token_level_and_sampling_is_reproducible(tmp_path, capsys):
    corpus = transformer_lm.builtin_corpus(seed=0)
    assert corpus == transformer_lm.builtin_corpus(seed=0) and 30_000 < len(corpus) < 80_000
    argv = ["--out", str(tmp_path / "lm"), "--max-epochs", "2", "--limit-train-batches", "8", "--limit-val-batches", "1",
            "--sample-chars", "40", "--warmup", "2", *EAGER]
    assert transformer_lm.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "lm" / "version_0" / "metrics.csv")
    nll, tokens, ppl = (_column(rows, f"val/{n}") for n in ("nll_sum", "tokens", "ppl"))
    assert len(ppl) == 2 and ppl[1] < ppl[0] < 37  # learning, and better than a uniform guess over 37 characters
    assert tokens == [64.0, 64.0]  # tokens per row: the window length
    assert ppl == pytest.approx([math.exp(a / b) for a, b in zip(nll, tokens)], rel=1e-6)
    # 16 steps with 2 batches per update: the optimizer (AdamW inside multi_steps) updated 8 times
    state = lf.load(tmp_path / "lm" / "version_0" / "checkpoints" / "last.safetensors")
    assert int(state["step"]) == 16 and int(state["opt_state"]["gradient_step"]) == 8
    assert "val perplexity" in printed and "sample (temperature 0.8): '3 plus 4 is" in printed

    # sampling is a pure function of the params and the key: the same key, the same text
    torch.manual_seed(0)
    model = transformer_lm.CharTransformer(37, context=16, width=16, heads=4, layers=1, dropout=0.1)
    apply, params = lf.functionalize(model)
    draw = lambda seed: transformer_lm.sample(apply, params, [1, 2], 24, context=16, temperature=1.0, key=lf.random.key(seed))  # noqa: E731
    assert draw(0) == draw(0) != draw(1)


def test_perplexity_is_exp_of_total_nll_over_total_tokens():
    # unequal batches: the ratio of row-weighted means of per-row sums is the set's NLL per token
    nll = [torch.tensor([2.0, 3.0, 1.0]), torch.tensor([5.0])]  # per-row NLL sums, batches of 3 and 1 rows
    tokens = [torch.tensor([4.0, 4.0, 2.0]), torch.tensor([6.0])]
    rows = sum(len(b) for b in nll)
    metrics = {"val/nll_sum": float(sum(b.sum() for b in nll)) / rows, "val/tokens": float(sum(b.sum() for b in tokens)) / rows}
    ctx = lf.callbacks.Context(state=None, step=0, epoch=0, batch_idx=0, metrics=metrics)
    signal = transformer_lm.Perplexity().on_validation_end(ctx)
    assert signal.log["val/ppl"] == pytest.approx(math.exp(11.0 / 16.0), rel=1e-12)


def test_dp_mnist_spends_the_budget_it_reports(tmp_path, mnist_dir, capsys):
    argv = ["--data-dir", str(mnist_dir), "--out", str(tmp_path / "dp"), "--max-epochs", "3", "--limit-train-batches", "6",
            "--limit-val-batches", "1", "--hidden", "32", *EAGER]
    assert dp_mnist.main(argv) == 0
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "dp" / "version_0" / "metrics.csv")
    acc, eps = _column(rows, "val/acc"), _column(rows, "privacy/epsilon")
    assert len(acc) == 3 and acc[-1] > 0.3  # chance is 0.1
    expected = [lf.privacy.epsilon(noise_multiplier=1.1, sample_rate=256 / 9000, steps=s, delta=1e-5) for s in (6, 12, 18)]
    assert eps == pytest.approx(expected, rel=1e-9) and eps[0] < eps[1] < eps[2]
    assert f"epsilon {expected[-1]:.3f} at delta 1e-05" in printed

    # a target epsilon stops the run before it is exceeded
    budget = lf.privacy.max_steps(noise_multiplier=1.1, sample_rate=256 / 9000, delta=1e-5, target_epsilon=1.0)
    assert dp_mnist.main([*argv[:2], "--out", str(tmp_path / "dp2"), *argv[4:], "--max-epochs", "50", "--target-epsilon", "1.0"]) == 0
    assert f"trained {budget} DP-SGD steps" in capsys.readouterr().out


def test_maml_beats_joint_pretraining_after_adaptation(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "maml"), "--max-epochs", "1", "--limit-train-batches", "150", "--tasks", "3750",
            "--eval-tasks", "200", "--no-jit"]
    assert maml_sine.main(argv) == 0
    printed = capsys.readouterr().out
    table = {}
    for line in printed.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in {"0", "1", "5", "10"}:
            table[int(parts[0])] = (float(parts[1]), float(parts[2]))
    assert sorted(table) == [0, 1, 5, 10]
    maml, baseline = ({k: v[i] for k, v in table.items()} for i in (0, 1))
    assert maml[1] < maml[0]  # one SGD step on 10 points helps the meta-learned init
    assert maml[1] < baseline[1] and maml[5] < baseline[5]
    for name in ("maml", "baseline"):
        assert len(_column(_rows(tmp_path / "maml" / name / "version_0" / "metrics.csv"), "val/loss")) == 1


# ---------------------------------------------------------------------------- the main job, compiled


@pytest.mark.compile
def test_main_job_compiled(tmp_path, mnist_dir, monkeypatch, capsys):
    # the README's command line (run from the repository root, relative --data-dir), tiny settings
    monkeypatch.chdir(ROOT)
    out = tmp_path / "main"
    argv = ["--data-dir", "../shared/data/MNIST/raw", "--out", str(out), "--max-epochs", "2", "--limit-train-batches", "25",
            "--limit-val-batches", "1", "--jit-mode", "sync"]
    assert autoencoder.main(argv) == 0
    printed = capsys.readouterr().out
    assert "compiled with lf.jit before the first step" in printed and "trained 50 steps" in printed
    # one graph for the train step, one for the eval step, no breaks (conftest resets the counters)
    counters = torch._dynamo.utils.counters
    assert counters["stats"]["unique_graphs"] == 2 and not counters["graph_break"]
    run = out / "version_0"
    val = _column(_rows(run / "metrics.csv"), "val/loss")
    assert len(val) == 2 and val[1] < val[0]
    assert (run / "reconstructions.png").is_file() and (run / "checkpoints" / "last.safetensors").is_file()
