"""The seed's LitAutoEncoder (784-64-3-64-784), the lightfn way.

    python examples/autoencoder.py --data-dir ../shared/data/MNIST/raw
    python examples/autoencoder.py --max-epochs 1 --no-jit          # quick, eager

What changes from Lightning: the encoder and decoder are plain modules turned into pure
functions of their params (``lf.functionalize``); the LightningModule becomes one
``loss_fn(params, batch) -> (loss, metrics)``; ``configure_optimizers`` becomes
``lf.optim.adam``; the Trainer is ``fit`` over a pure train step, compiled whole. Everything
lands in ``--out/version_N/``: TensorBoard events, ``metrics.csv``, ``checkpoints/``
(best by ``val/loss`` and ``last.safetensors``) and ``reconstructions.png``. At the end
the encoder is used alone, with params read back from the best checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import lightfn as lf
from lightfn.fit import fit

from _common import describe_jit, example_parser, jit_arg, setup
from _data import load_mnist


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoEncoder:
    """The model as pure functions: ``encode(params["encoder"], x)``, ``decode(...)``,
    ``loss_fn(params, batch) -> (loss, metrics)``, and the initial ``params`` pytree."""

    encode: Callable[..., torch.Tensor]
    decode: Callable[..., torch.Tensor]
    loss_fn: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
    params: dict[str, dict[str, torch.Tensor]]


def autoencoder() -> AutoEncoder:
    """Two modules -> two pure functions, one params pytree (initialized from torch's seed)."""
    encoder = nn.Sequential(nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 3))
    decoder = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 28 * 28))
    encode, enc_params = lf.functionalize(encoder)
    decode, dec_params = lf.functionalize(decoder)

    # training_step + validation_step + self.log: one pure loss function returning metrics
    def loss_fn(params, batch):
        (x,) = batch
        x = x.view(x.shape[0], -1)
        x_hat = decode(params["decoder"], encode(params["encoder"], x))
        return F.mse_loss(x_hat, x), {"mae": (x_hat - x).abs().mean()}

    return AutoEncoder(encode=encode, decode=decode, loss_fn=loss_fn, params={"encoder": enc_params, "decoder": dec_params})


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "autoencoder", max_epochs=20, batch_size=64, lr=1e-3)
    args = parser.parse_args(argv)
    setup(args)
    t0 = time.monotonic()
    data = load_mnist(args.data_dir, download=not args.no_download)
    print(f"data: {data.source}: {len(data.train_images)} train / {len(data.val_images)} val images")
    model = autoencoder()
    encode, decode, loss_fn = model.encode, model.decode, model.loss_fn

    opt = lf.optim.adam(args.lr)  # configure_optimizers
    state = lf.TrainState.create(params=model.params, optimizer=opt, seed=args.seed)
    train = lf.data.ArrayLoader((data.train_images,), batch_size=args.batch_size, seed=args.seed)
    val = lf.data.ArrayLoader((data.val_images,), batch_size=500, shuffle=False, drop_last=False)

    # one run folder for both loggers and the checkpoints, like Lightning's version_N
    tensorboard = lf.loggers.TensorBoardLogger(args.out, name="")
    csv = lf.loggers.CSVLogger(args.out, name="", version=tensorboard.version)
    run_dir = tensorboard.log_dir
    checkpoint = lf.callbacks.ModelCheckpoint(run_dir / "checkpoints", monitor="val/loss", save_last=True)
    printer = lf.callbacks.ProgressLog(max_epochs=args.max_epochs)  # one line per epoch, terminal or not

    n_params = lf.tree.size(state.params)
    how = describe_jit(args)
    print(f"training 784-64-3-64-784 autoencoder ({n_params:,} params), Adam lr {args.lr:g}, batch {args.batch_size}, "
          f"{len(train)} steps/epoch, {args.max_epochs} epoch(s), {how}, {torch.get_num_threads()} CPU thread(s)")
    t_fit = time.monotonic()
    state = fit(
        lf.train_step(loss_fn, opt), state, train,
        val_data=val, eval_step=lf.eval_step(loss_fn),
        max_epochs=args.max_epochs, max_steps=args.max_steps,
        limit_train_batches=args.limit_train_batches, limit_val_batches=args.limit_val_batches,
        jit=jit_arg(args), callbacks=[checkpoint, printer], loggers=[tensorboard, csv],
        hparams={"lr": args.lr, "batch_size": args.batch_size, "max_epochs": args.max_epochs, "seed": args.seed, "data": data.source},
    )
    t_fit = time.monotonic() - t_fit

    # inputs (top row) over their reconstructions (bottom row), as a PNG and in TensorBoard
    params = lf.tree.to_device(state.params, "cpu")
    images = data.val_images.view(len(data.val_images), -1)
    with torch.no_grad():
        recon = decode(params["decoder"], encode(params["encoder"], images))
    val_loss = F.mse_loss(recon, images).item()
    grid = lf.loggers.image_grid(torch.cat([data.val_images[:8], recon[:8].clamp(0, 1).view(8, 1, 28, 28)]), nrow=8)
    grid_path = run_dir / "reconstructions.png"
    # Imported here, not at the top: torchvision's import takes seconds and pulls in
    # torch._dynamo, all before the first training step.
    from torchvision.utils import save_image

    save_image(grid, grid_path)
    tensorboard.log_image("val/reconstructions", grid, step=int(state.step))
    for logger in (tensorboard, csv):
        logger.close()

    # the encoder alone, from a checkpoint: all inference needs is lf.load(path)["params"]
    ckpt_path = pathlib.Path(checkpoint.best_model_path or checkpoint.last_model_path)
    enc_params = lf.load(ckpt_path)["params"]["encoder"]
    with torch.no_grad():
        codes = encode(enc_params, images)

    best = f"; best checkpoint val/loss {checkpoint.best_model_score:.4f}" if checkpoint.best_model_score is not None else ""
    print(f"\ntrained {int(state.step)} steps in {t_fit:.1f} s; final val loss (mse) {val_loss:.4f}{best}")
    print(f"encoder alone, params from {ckpt_path.name}: {tuple(data.val_images.shape)} images -> embeddings {tuple(codes.shape)}")
    for d in range(3):
        mean = codes[data.val_labels == d].mean(0)
        print(f"  mean embedding of digit {d}: [{', '.join(f'{v:+.2f}' for v in mean.tolist())}]")
    print(f"run folder      {run_dir}")
    print(f"  logs          TensorBoard events and {csv.metrics_file.name} (tensorboard --logdir {args.out})")
    print(f"  checkpoints   {', '.join(sorted(p.name for p in (run_dir / 'checkpoints').glob('*.safetensors')))}")
    print(f"  image         {grid_path}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
