"""A learning-rate sweep trained as ONE ensemble: K MLPs, K rates, one compiled step.

    python examples/ensemble.py --data-dir ../shared/data/MNIST/raw
    python examples/ensemble.py --lrs 1e-4,1e-3,1e-2 --max-epochs 2

``lf.optim.inject_hyperparams(lf.optim.adam)(lr=r)`` keeps the learning rate in the
optimizer state as a tensor, so states built with different rates have the same structure
and stack (``lf.tree.stack``) into one state with a leading *member* axis. ``lf.ensemble``
vectorizes the ordinary train step over that axis: ``lf.fit`` then trains every rate at
once, in one compiled graph, on the same batches, as if each had been trained alone.

Every member starts from the same initial weights and seed, so the rate is the only
difference. fit logs each metric as the mean over members (``val/loss``) and per member
(``val/loss/member_<i>``), and the rates themselves (``lr/member_<i>``), to
``<out>/version_0/metrics.csv``. At the end the script evaluates all members on the
validation set in one call and prints each rate's loss and accuracy, and the best rate.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import lightfn as lf
from lightfn.fit import fit

from _common import describe_jit, example_parser, jit_arg, setup
from _data import load_mnist

DEFAULT_LRS = "3e-5,1e-4,3e-4,1e-3,3e-3,1e-2,3e-2"


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "ensemble", max_epochs=3, batch_size=128, lr=1e-3)
    parser.add_argument("--lrs", default=DEFAULT_LRS, help=f"comma-separated learning rates, one member each (default {DEFAULT_LRS}); "
                        "--lr is not used")
    args = parser.parse_args(argv)
    setup(args)
    lrs = [float(r) for r in args.lrs.split(",")]
    t0 = time.monotonic()
    data = load_mnist(args.data_dir, download=not args.no_download)
    print(f"data: {data.source}: {len(data.train_images)} train / {len(data.val_images)} val images")

    apply, params = lf.functionalize(mlp())

    def loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(dim=1) == y).float().mean()}

    make = lf.optim.inject_hyperparams(lf.optim.adam)
    # One state per rate, same weights and seed; stacked, they are one ensemble state.
    members = [lf.TrainState.create(params=params, optimizer=make(lr=lr), seed=args.seed) for lr in lrs]
    state = lf.tree.stack(members)
    # The step's own optimizer only says how to update; each member's rate is in its state.
    step = lf.ensemble(lf.train_step(loss_fn, make(lr=lrs[0])))
    eval_step = lf.ensemble(lf.eval_step(loss_fn))

    train = lf.data.ArrayLoader((data.train_images, data.train_labels), batch_size=args.batch_size, seed=args.seed)
    val = lf.data.ArrayLoader((data.val_images, data.val_labels), batch_size=500, shuffle=False, drop_last=False)
    logger = lf.loggers.CSVLogger(args.out, name="")
    how = describe_jit(args)
    print(f"training {len(lrs)} MLPs 784-128-10 ({lf.tree.size(params):,} params each) as one ensemble, Adam with "
          f"lr in {lrs}, batch {args.batch_size}, {len(train)} steps/epoch, {args.max_epochs} epochs, {how}")

    state = fit(
        step, state, train, val_data=val, eval_step=eval_step,
        max_epochs=args.max_epochs, max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit_arg(args), callbacks=[lf.callbacks.ProgressLog(max_epochs=args.max_epochs)], loggers=[logger],
        log_every_n_steps=10, hparams={"lrs": lrs, "batch_size": args.batch_size, "seed": args.seed, "data": data.source},
    )
    logger.close()

    # Every member on the whole validation set at once: (K,) losses and accuracies.
    with torch.no_grad():
        final = eval_step(lf.tree.to_device(state, "cpu"), (data.val_images, data.val_labels))
    losses, accs = final["loss"].tolist(), final["acc"].tolist()
    print(f"\n{'lr':>8}  {'val loss':>8}  {'val acc':>7}")
    for lr, loss, acc in zip(lrs, losses, accs):
        print(f"{lr:>8.0e}  {loss:>8.4f}  {acc:>7.4f}")
    best = min(range(len(lrs)), key=losses.__getitem__)
    print(f"best lr {lrs[best]:g} (member {best}): val loss {losses[best]:.4f}, val acc {accs[best]:.4f}")
    print(f"metrics: {logger.metrics_file}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
