"""One fresh process of benchmarks/startup.py: run one system's main job, report when things happened.

    python benchmarks/_startup_probe.py SYSTEM --data-dir D --out DIR --epochs N [--limit-train-batches K] ...

Times are seconds since ``LIGHTFN_BENCH_T0`` (a ``time.time()`` the parent took just
before starting this process), so they include the interpreter's own start. The last
stdout line is JSON: ``import_torch_s`` (``import torch`` done), ``first_step_s`` (the
first train step finished), ``end_s`` (the job done: training, validation and, for
lightfn, checkpoints and logs written), ``steps``.

This file imports nothing beyond the standard library before the system's own imports:
what it measures is what the system's user pays. The job is the main job's (bash
scripts/run.sh runs examples/autoencoder.py): the seed autoencoder (784-64-3-64-784),
Adam 1e-3, batch 64, MNIST's 55k/5k split, validation after every epoch; the
``lightfn_cnn*`` systems run examples/mnist_classifier.py's job instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time

T0 = float(os.environ.get("LIGHTFN_BENCH_T0") or time.time())
EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
LR, BATCH, CNN_BATCH, VAL_BATCH, SEED = 1e-3, 64, 128, 500, 0


def now() -> float:
    return time.time() - T0


def _limit(value: int | None, n: int) -> int:
    return n if value is None else min(value, n)


def run_import_torch(args, marks: dict) -> None:
    import torch  # noqa: F401

    marks["import_torch_s"] = now()


def run_lightfn(args, marks: dict, *, jit: bool | str) -> None:
    import torch  # noqa: F401

    marks["import_torch_s"] = now()
    # The example's own pieces: examples/ goes first on the path (both folders have a _common.py).
    sys.path.insert(0, str(EXAMPLES))
    import argparse

    import lightfn as lf
    from lightfn.fit import fit

    from _common import setup
    from _data import load_mnist
    from autoencoder import autoencoder

    setup(argparse.Namespace(seed=SEED, threads=args.threads))
    data = load_mnist(args.data_dir, download=False)
    model = autoencoder()
    opt = lf.optim.adam(LR)
    state = lf.TrainState.create(params=model.params, optimizer=opt, seed=SEED)
    train = lf.data.ArrayLoader((data.train_images,), batch_size=BATCH, seed=SEED)
    val = lf.data.ArrayLoader((data.val_images,), batch_size=VAL_BATCH, shuffle=False, drop_last=False)
    tensorboard = lf.loggers.TensorBoardLogger(args.out, name="")
    csv = lf.loggers.CSVLogger(args.out, name="", version=tensorboard.version)
    checkpoint = lf.callbacks.ModelCheckpoint(tensorboard.log_dir / "checkpoints", monitor="val/loss", save_last=True)

    state = fit(
        lf.train_step(model.loss_fn, opt), state, train, val_data=val, eval_step=lf.eval_step(model.loss_fn),
        max_epochs=args.epochs, limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit, callbacks=[checkpoint, lf.callbacks.ProgressLog(max_epochs=args.epochs), _first_step(lf, marks)],
        loggers=[tensorboard, csv],
    )
    for logger in (tensorboard, csv):
        logger.close()
    marks["steps"] = int(state.step)


def run_lightfn_cnn(args, marks: dict, *, jit: bool) -> None:
    """examples/mnist_classifier.py's job: its BatchNorm + dropout CNN, batch 128, explicit
    buffers, accuracy, early stopping and a checkpoint on val/acc, a CSV log."""
    import torch  # noqa: F401

    marks["import_torch_s"] = now()
    sys.path.insert(0, str(EXAMPLES))
    import argparse

    import lightfn as lf
    from lightfn.fit import fit

    from _common import setup
    from _data import load_mnist
    from mnist_classifier import cnn, make_loss

    setup(argparse.Namespace(seed=SEED, threads=args.threads))
    data = load_mnist(args.data_dir, download=False)
    apply, params, buffers = lf.functionalize(cnn(), with_state=True)

    opt = lf.optim.adam(LR)
    state = lf.TrainState.create(params=params, buffers=buffers, optimizer=opt, seed=SEED)
    train = lf.data.ArrayLoader((data.train_images, data.train_labels), batch_size=CNN_BATCH, seed=SEED)
    val = lf.data.ArrayLoader((data.val_images, data.val_labels), batch_size=VAL_BATCH, shuffle=False, drop_last=False)
    csv = lf.loggers.CSVLogger(args.out, name="")
    callbacks = [lf.callbacks.EarlyStopping(monitor="val/acc", mode="max", patience=2),
                 lf.callbacks.ModelCheckpoint(csv.log_dir / "checkpoints", monitor="val/acc", mode="max"),
                 lf.callbacks.ProgressLog(max_epochs=args.epochs), _first_step(lf, marks)]
    state = fit(
        lf.train_step(make_loss(apply, train=True), opt, with_state=True), state, train,
        val_data=val, eval_step=lf.eval_step(make_loss(apply, train=False), with_state=True),
        max_epochs=args.epochs, limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit, callbacks=callbacks, loggers=[csv],
    )
    csv.close()
    marks["steps"] = int(state.step)


def _first_step(lf, marks: dict):
    class FirstStep(lf.callbacks.Callback):
        def on_train_batch_end(self, ctx):
            marks.setdefault("first_step_s", now())

    return FirstStep()


def run_torch(args, marks: dict) -> None:
    import torch

    marks["import_torch_s"] = now()
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(EXAMPLES))
    from _data import load_mnist

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data_dir, download=False)
    x, xv = data.train_images.flatten(1), data.val_images.flatten(1)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 3), nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 784))
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    g = torch.Generator().manual_seed(SEED)
    steps = 0
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(_limit(args.limit_train_batches, len(x) // BATCH)):
            xb = x[order[i * BATCH : (i + 1) * BATCH]]
            loss = F.mse_loss(model(xb), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            marks.setdefault("first_step_s", now())
        with torch.no_grad():
            n_val = _limit(args.limit_val_batches, -(-len(xv) // VAL_BATCH))
            val = [F.mse_loss(model(xv[i * VAL_BATCH : (i + 1) * VAL_BATCH]), xv[i * VAL_BATCH : (i + 1) * VAL_BATCH]) for i in range(n_val)]
        print(f"epoch done, val/loss {torch.stack(val).mean().item():.4f}", flush=True)
    marks["steps"] = steps


def run_lightning(args, marks: dict) -> None:
    import torch

    marks["import_torch_s"] = now()
    try:
        import lightning as L
    except ImportError:
        import pytorch_lightning as L
    import torch.nn.functional as F
    from torch import nn

    sys.path.insert(0, str(EXAMPLES))
    from _data import load_mnist

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    data = load_mnist(args.data_dir, download=False)

    class LitAutoEncoder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 3))
            self.decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 784))

        def training_step(self, batch, batch_idx):
            (x,) = batch
            x = x.flatten(1)
            loss = F.mse_loss(self.decoder(self.encoder(x)), x)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            (x,) = batch
            x = x.flatten(1)
            self.log("val/loss", F.mse_loss(self.decoder(self.encoder(x)), x))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

        def on_train_batch_end(self, *unused):
            marks.setdefault("first_step_s", now())

    ds = torch.utils.data.TensorDataset
    train = torch.utils.data.DataLoader(ds(data.train_images), batch_size=BATCH, shuffle=True, drop_last=True)
    val = torch.utils.data.DataLoader(ds(data.val_images), batch_size=VAL_BATCH)
    trainer = L.Trainer(
        max_epochs=args.epochs, limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        default_root_dir=args.out, accelerator="cpu", devices=1, enable_progress_bar=False,
    )
    trainer.fit(LitAutoEncoder(), train, val)
    marks["steps"] = int(trainer.global_step)


def run_jax(args, marks: dict) -> None:
    import jax
    import numpy as np
    import optax

    sys.path.insert(0, str(EXAMPLES))
    import torch  # noqa: F401 - the examples' loader returns tensors

    marks["import_torch_s"] = now()
    from _data import load_mnist

    data = load_mnist(args.data_dir, download=False)
    x, xv = data.train_images.flatten(1).numpy(), data.val_images.flatten(1).numpy()
    from seed_autoencoder import jax_problem  # the seed model seed_autoencoder.py times

    params, loss_fn, opt = jax_problem(SEED)
    opt_state = opt.init(params)

    @jax.jit
    def step(p, s, xb):
        loss, grads = jax.value_and_grad(loss_fn)(p, xb)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    val_loss = jax.jit(loss_fn)
    rng = np.random.default_rng(SEED)
    steps = 0
    for _ in range(args.epochs):
        order = rng.permutation(len(x))
        for i in range(_limit(args.limit_train_batches, len(x) // BATCH)):
            params, opt_state, loss = step(params, opt_state, x[order[i * BATCH : (i + 1) * BATCH]])
            steps += 1
            if "first_step_s" not in marks:
                loss.block_until_ready()
                marks["first_step_s"] = now()
        n_val = _limit(args.limit_val_batches, -(-len(xv) // VAL_BATCH))
        val = [float(val_loss(params, xv[i * VAL_BATCH : (i + 1) * VAL_BATCH])) for i in range(n_val)]
        print(f"epoch done, val/loss {sum(val) / len(val):.4f}", flush=True)
    marks["steps"] = steps


SYSTEMS = {
    "import_torch": run_import_torch,
    "lightfn": lambda a, m: run_lightfn(a, m, jit=True),  # fit's default: compiled in the background
    "lightfn_sync": lambda a, m: run_lightfn(a, m, jit="sync"),  # compiled before the first step
    "lightfn_eager": lambda a, m: run_lightfn(a, m, jit=False),
    "lightfn_cnn": lambda a, m: run_lightfn_cnn(a, m, jit=True),
    "lightfn_cnn_eager": lambda a, m: run_lightfn_cnn(a, m, jit=False),
    "torch_loop": run_torch,
    "lightning": run_lightning,
    "jax": run_jax,
}


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("system", choices=sorted(SYSTEMS))
    p.add_argument("--data-dir", type=pathlib.Path, required=True)
    p.add_argument("--out", type=pathlib.Path, required=True, help="folder for the job's logs and checkpoints")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--limit-val-batches", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    marks: dict = {}
    SYSTEMS[args.system](args, marks)
    marks["end_s"] = now()
    print(json.dumps(marks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
