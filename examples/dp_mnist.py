"""A differentially private MNIST classifier: DP-SGD, Poisson sampling and a privacy budget.

    python examples/dp_mnist.py --data-dir ../shared/data/MNIST/raw
    python examples/dp_mnist.py --target-epsilon 1.0          # stop once epsilon reaches 1

DP-SGD (Abadi et al. 2016) in three lightfn pieces:

- ``lf.data.ArrayLoader(..., poisson_rate=q)``: every batch holds each training image
  independently with probability ``q`` (the sampling the privacy analysis assumes); a
  batch is a fixed-shape ``MaskedBatch``, so the compiled step never recompiles;
- ``lf.privacy.dp_train_step``: each image's gradient clipped to norm ``--clip``, the sum
  noised with std ``--noise * --clip`` and divided by the expected batch size ``q * N``;
- ``lf.privacy.PrivacyBudget``: logs ``privacy/epsilon`` (at ``--delta``) every epoch and
  stops fit before ``--target-epsilon`` would be exceeded.

The model is a small MLP with tanh activations (bounded activations keep per-example
gradient norms, and so the clipping bias, small; BatchNorm has no per-sample gradient).
Validation is ordinary: the held-out images are never trained on, so evaluating them
spends no privacy.
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


def mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.Tanh(), nn.Linear(hidden, 10))


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "dp_mnist", max_epochs=15, batch_size=256, lr=0.1)
    parser.add_argument("--hidden", type=int, default=128, help="hidden units (default 128)")
    parser.add_argument("--clip", type=float, default=1.0, help="per-example gradient norm bound C (default 1.0)")
    parser.add_argument("--noise", type=float, default=1.1, help="noise multiplier sigma: noise std is sigma * C (default 1.1)")
    parser.add_argument("--delta", type=float, default=1e-5, help="delta of (epsilon, delta)-DP (default 1e-5)")
    parser.add_argument("--target-epsilon", type=float, default=None, help="stop before epsilon exceeds this")
    args = parser.parse_args(argv)
    args_batch = args.batch_size  # the *expected* batch size: q = batch / N
    setup(args)
    t0 = time.monotonic()
    data = load_mnist(args.data_dir, download=not args.no_download)
    n = len(data.train_images)
    if args.delta >= 1 / n:  # delta should be well below 1/N: a larger one allows leaking whole records
        print(f"warning: delta {args.delta:g} is not below 1/N = {1 / n:.2g}: the guarantee is weak")
    print(f"data: {data.source}: {n} train / {len(data.val_images)} val images")

    apply, params = lf.functionalize(mlp(args.hidden))

    def loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x)
        return F.cross_entropy(logits, y), {"acc": (logits.argmax(1) == y).float().mean()}

    q = min(1.0, args_batch / n)
    train = lf.data.ArrayLoader((data.train_images, data.train_labels), poisson_rate=q, seed=args.seed)
    val = lf.data.ArrayLoader((data.val_images, data.val_labels), batch_size=500, shuffle=False, drop_last=False)
    opt = lf.optim.sgd(args.lr, momentum=0.9)
    step = lf.privacy.dp_train_step(
        loss_fn, opt, l2_norm_clip=args.clip, noise_multiplier=args.noise, expected_batch_size=train.expected_batch_size,
    )
    state = lf.TrainState.create(params=params, optimizer=opt, seed=args.seed)
    budget = lf.privacy.PrivacyBudget(noise_multiplier=args.noise, sample_rate=q, delta=args.delta,
                                      target_epsilon=args.target_epsilon)
    logger = lf.loggers.CSVLogger(args.out, name="")
    printer = lf.callbacks.ProgressLog(max_epochs=args.max_epochs)

    how = describe_jit(args)
    print(f"DP-SGD on a 784-{args.hidden}-10 tanh MLP ({lf.tree.size(params):,} params): clip C={args.clip:g}, "
          f"noise sigma={args.noise:g}, Poisson rate q={q:.4g} (expected batch {train.expected_batch_size:.0f}, "
          f"capacity {train.batch_size}), SGD lr {args.lr:g} momentum 0.9, {len(train)} steps/epoch, "
          f"up to {args.max_epochs} epochs, {how}")
    state = fit(
        step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn),
        max_epochs=args.max_epochs, max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit_arg(args), callbacks=[budget, printer], loggers=[logger],
        hparams={"lr": args.lr, "expected_batch": args_batch, "clip": args.clip, "noise": args.noise, "delta": args.delta,
                 "seed": args.seed, "data": data.source},
    )
    logger.close()

    params = lf.tree.to_device(state.params, "cpu")
    with torch.no_grad():
        accuracy = (apply(params, data.val_images).argmax(1) == data.val_labels).float().mean().item()
    steps = int(state.step)
    eps = budget.epsilon(steps)
    print(f"\ntrained {steps} DP-SGD steps; val accuracy {accuracy:.4f}; "
          f"privacy spent: epsilon {eps:.3f} at delta {args.delta:g} (RDP accountant, {steps} steps at q={q:.4g}, sigma={args.noise:g})")
    print(f"metrics: {logger.metrics_file}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
