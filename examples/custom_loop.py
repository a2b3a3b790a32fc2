"""The autoencoder trained without ``fit``: the loop written out from public pieces.

    python examples/custom_loop.py --data-dir ../shared/data/MNIST/raw
    python examples/custom_loop.py --max-epochs 1 --no-jit

``fit`` is a convenience, not a gate: everything it does is a public primitive. The same
model as ``autoencoder.py`` is trained here by a loop that fits on one screen:
``lf.train_step`` builds the pure step, ``lf.jit`` compiles it (``donate=True``: the new
state is written into the old state's memory; ``background=True``: the steps run
eagerly, and once they have taken longer than a build would, a child process builds the
graph and the loop switches to it), ``lf.data.ArrayLoader.iter_epoch`` gives
each epoch's batches, a ``CSVLogger`` records metrics and ``lf.save`` writes the state
as safetensors after every epoch. Losses are summed on the device and copied to the host
only when logged, so the step never waits for the host.
"""

from __future__ import annotations

import itertools
import sys
import time

import torch

import lightfn as lf

from _common import example_parser, setup
from _data import load_mnist
from autoencoder import autoencoder


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "custom_loop", max_epochs=10, batch_size=64, lr=1e-3)
    parser.add_argument("--log-every", type=int, default=50, help="log the step loss every this many steps")
    args = parser.parse_args(argv)
    setup(args)
    data = load_mnist(args.data_dir, download=not args.no_download)
    print(f"data: {data.source}: {len(data.train_images)} train / {len(data.val_images)} val images")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = autoencoder()
    opt = lf.optim.adam(args.lr)
    state = lf.tree.to_device(lf.TrainState.create(params=model.params, optimizer=opt, seed=args.seed), device)
    # On a CPU the steps run eagerly and the graphs build in a child process once the loop
    # has run long enough to use them (background=True; a later run loads them at once);
    # --jit-mode sync compiles up front.
    background = device.type == "cpu" and args.jit_mode != "sync"
    step_fn = lf.jit(lf.train_step(model.loss_fn, opt), donate=True, disable=args.no_jit, background=background)
    eval_fn = lf.jit(lf.eval_step(model.loss_fn), disable=args.no_jit, background=background)
    # the data lives on the device: batches are slices, no copy per step
    train = lf.data.ArrayLoader((data.train_images,), batch_size=args.batch_size, seed=args.seed, device=device)
    val = lf.data.ArrayLoader((data.val_images,), batch_size=500, shuffle=False, drop_last=False, device=device)
    logger = lf.loggers.CSVLogger(args.out, name="")
    ckpt = logger.log_dir / "checkpoints" / "last.safetensors"
    n_batches = len(train) if args.limit_train_batches is None else min(len(train), args.limit_train_batches)
    max_steps = args.max_steps or args.max_epochs * n_batches

    step, t0 = 0, time.monotonic()
    for epoch in range(args.max_epochs):
        loss_sum, n = torch.zeros((), device=device), 0  # summed on the device: no host sync per step
        for batch in itertools.islice(train.iter_epoch(epoch), n_batches):
            state, metrics = step_fn(state, batch)
            loss_sum += metrics["loss"]
            step, n = step + 1, n + 1
            if step % args.log_every == 0:
                logger.log_metrics({"train/loss": metrics["loss"].item(), "epoch": epoch}, step=step)
            if step >= max_steps:
                break
        val_losses = [eval_fn(state, batch)["loss"] * len(batch[0]) for batch in val]
        val_loss = (torch.stack(val_losses).sum() / val.num_samples).item()
        train_loss = loss_sum.item() / n
        logger.log_metrics({"train/loss_epoch": train_loss, "val/loss": val_loss, "epoch": epoch}, step=step)
        lf.save(ckpt, state, metadata={"epoch": epoch, "step": step, "val/loss": val_loss})
        print(f"epoch {epoch + 1}/{args.max_epochs}  step {step}  train/loss {train_loss:.4f}  val/loss {val_loss:.4f}  "
              f"{time.monotonic() - t0:.1f} s")
        if step >= max_steps:
            break
    logger.close()

    # the checkpoint is a plain pytree: load it back into the state's structure
    restored = lf.load(ckpt, like=state)
    same = all(torch.equal(a, b) for a, b in zip(lf.tree.leaves(restored.params), lf.tree.leaves(state.params)))
    print(f"\ntrained {step} steps; {ckpt} holds {lf.read_metadata(ckpt)['metadata']} and restores the state exactly: {same}")
    print(f"metrics: {logger.metrics_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
