"""A small CNN classifier with BatchNorm and dropout: explicit buffers, accuracy, early stopping.

    python examples/mnist_classifier.py --data-dir ../shared/data/MNIST/raw

BatchNorm's running statistics are state a pure function may not mutate in place, so the
model is functionalized ``with_state=True``: ``apply(params, buffers, x, train=...)``
returns the output and the new buffers, and the loss function hands them back to the
step, which stores them in ``state.buffers``. Validation calls ``train=False`` (running
statistics, no dropout). Dropout draws from the step's key (``fold_in(state.rng,
state.step)``), so a run is reproducible, compiled or not. Accuracy is just another metric
the loss function returns; ``EarlyStopping`` watches ``val/acc``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lightfn as lf
from lightfn.fit import fit

from _common import describe_jit, example_parser, jit_arg, setup
from _data import load_mnist


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),  # 16 x 14 x 14
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),  # 32 x 7 x 7
        nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 7 * 7, 10),
    )


def make_loss(apply: Callable[..., Any], *, train: bool) -> Callable[..., Any]:
    """``loss_fn(params, buffers, batch) -> (loss, {"acc": ...}, new_buffers)`` of the
    functionalized CNN, in training (batch statistics, dropout) or eval mode."""

    def loss_fn(params, buffers, batch):
        x, y = batch
        logits, new_buffers = apply(params, buffers, x, train=train)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return F.cross_entropy(logits, y), {"acc": accuracy}, new_buffers

    return loss_fn


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "mnist_classifier", max_epochs=8, batch_size=128, lr=1e-3)
    parser.add_argument("--patience", type=int, default=2, help="EarlyStopping patience, in validations")
    args = parser.parse_args(argv)
    setup(args)
    t0 = time.monotonic()
    data = load_mnist(args.data_dir, download=not args.no_download)
    print(f"data: {data.source}: {len(data.train_images)} train / {len(data.val_images)} val images")

    apply, params, buffers = lf.functionalize(cnn(), with_state=True)
    opt = lf.optim.adam(args.lr)
    state = lf.TrainState.create(params=params, buffers=buffers, optimizer=opt, seed=args.seed)
    train = lf.data.ArrayLoader((data.train_images, data.train_labels), batch_size=args.batch_size, seed=args.seed)
    val = lf.data.ArrayLoader((data.val_images, data.val_labels), batch_size=500, shuffle=False, drop_last=False)
    logger = lf.loggers.CSVLogger(args.out, name="")
    early_stopping = lf.callbacks.EarlyStopping(monitor="val/acc", mode="max", patience=args.patience)
    checkpoint = lf.callbacks.ModelCheckpoint(logger.log_dir / "checkpoints", monitor="val/acc", mode="max")
    printer = lf.callbacks.ProgressLog(max_epochs=args.max_epochs)  # one line per epoch, terminal or not

    how = describe_jit(args)
    print(f"training a CNN with BatchNorm ({lf.tree.size(params):,} params, {lf.tree.size(buffers):,} buffer values), "
          f"Adam lr {args.lr:g}, batch {args.batch_size}, {len(train)} steps/epoch, up to {args.max_epochs} epochs "
          f"(early stopping on val/acc, patience {args.patience}), {how}")

    state = fit(
        lf.train_step(make_loss(apply, train=True), opt, with_state=True), state, train,
        val_data=val, eval_step=lf.eval_step(make_loss(apply, train=False), with_state=True),
        max_epochs=args.max_epochs, max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit_arg(args), callbacks=[early_stopping, checkpoint, printer], loggers=[logger],
        hparams={"lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "data": data.source},
    )
    logger.close()

    # the trained model in eval mode over the whole validation set, on the host
    params, buffers = lf.tree.to_device((state.params, state.buffers), "cpu")
    with torch.no_grad():
        logits, _ = apply(params, buffers, data.val_images, train=False)
    accuracy = (logits.argmax(dim=1) == data.val_labels).float().mean().item()
    stopped = f"stopped early after epoch {early_stopping.stopped_epoch + 1}" if early_stopping.wait_count >= args.patience else "ran all epochs"
    print(f"\ntrained {int(state.step)} steps ({stopped}); val accuracy {accuracy:.4f}; "
          f"best val/acc {checkpoint.best_model_score:.4f} in {checkpoint.best_model_path}")
    print(f"BatchNorm running mean of the first layer (buffers['1.running_mean'][:4]): {buffers['1.running_mean'][:4].tolist()}")
    print(f"metrics: {logger.metrics_file}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
