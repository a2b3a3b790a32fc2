"""A small MLP GAN on MNIST digits: Lightning's manual optimization, the functional way.

    python examples/gan.py --data-dir ../shared/data/MNIST/raw
    python examples/gan.py --max-epochs 1 --no-jit                  # quick, eager

In Lightning a GAN sets ``automatic_optimization = False`` and calls two optimizers by
hand inside ``training_step``. Here there is nothing to switch off: a step is any pure
function ``(state, batch) -> (state, metrics)``, so this one is written by hand. The state
is an ordinary ``lf.TrainState`` whose ``params`` and ``opt_state`` are dicts with a
``"generator"`` and a ``"discriminator"`` entry, one optimizer each. One step updates
the discriminator on real and generated digits, then the generator against the updated
discriminator; ``fit`` compiles the whole of it into one graph, logs its metrics
(``train/d_loss``, ``train/g_loss``, ``train/d_real``, ``train/d_fake``) and checkpoints
it like any other state. The end writes ``samples.png``, an 8x8 grid of generated digits.
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

LATENT = 64


def generator() -> nn.Sequential:
    # tanh: images in [-1, 1], the range the real digits are scaled to
    return nn.Sequential(nn.Linear(LATENT, 256), nn.LeakyReLU(0.2), nn.Linear(256, 28 * 28), nn.Tanh())


def discriminator() -> nn.Sequential:
    return nn.Sequential(nn.Linear(28 * 28, 256), nn.LeakyReLU(0.2), nn.Linear(256, 1))  # a logit: real or fake


def gan_step(
    generate: Callable[..., torch.Tensor],
    discriminate: Callable[..., torch.Tensor],
    opt_g: lf.optim.GradientTransformation,
    opt_d: lf.optim.GradientTransformation,
) -> Callable[[lf.TrainState, Any], tuple[lf.TrainState, dict[str, torch.Tensor]]]:
    """The hand-written step: one discriminator update, then one generator update."""

    def step(state: lf.TrainState, batch: Any) -> tuple[lf.TrainState, dict[str, torch.Tensor]]:
        (images,) = batch
        real = images.view(images.shape[0], -1) * 2 - 1
        n = real.shape[0]
        ones, zeros = torch.ones(n, 1, device=real.device), torch.zeros(n, 1, device=real.device)
        # noise for both updates in one draw, from the state's key and the step number: a
        # resumed run draws the same numbers
        noise = lf.random.normal(lf.random.fold_in(state.rng, state.step), (2, n, LATENT), device=real.device)
        g, d = state.params["generator"], state.params["discriminator"]

        # 1. discriminator: real digits -> 1, generated ones -> 0 (the generator is fixed here)
        fake = generate(g, noise[0]).detach()

        def d_loss_fn(d_params):
            real_logits, fake_logits = discriminate(d_params, real), discriminate(d_params, fake)
            loss = F.binary_cross_entropy_with_logits(real_logits, ones) + F.binary_cross_entropy_with_logits(fake_logits, zeros)
            return loss, (torch.sigmoid(real_logits).mean(), torch.sigmoid(fake_logits).mean())

        (d_loss, (d_real, d_fake)), d_grads = lf.value_and_grad(d_loss_fn, has_aux=True)(d)
        d_updates, d_opt_state = opt_d.update(d_grads, state.opt_state["discriminator"], d)
        d = lf.optim.apply_updates(d, d_updates)

        # 2. generator: make the updated discriminator call its digits real (non-saturating loss)
        def g_loss_fn(g_params):
            return F.binary_cross_entropy_with_logits(discriminate(d, generate(g_params, noise[1])), ones)

        g_loss, g_grads = lf.value_and_grad(g_loss_fn)(g)
        g_updates, g_opt_state = opt_g.update(g_grads, state.opt_state["generator"], g)
        g = lf.optim.apply_updates(g, g_updates)

        new_state = state.replace(
            step=state.step + 1,
            params={"generator": g, "discriminator": d},
            opt_state={"generator": g_opt_state, "discriminator": d_opt_state},
        )
        # d_real / d_fake: the discriminator's mean belief that real / generated digits are real
        return new_state, {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "d_real": d_real.detach(), "d_fake": d_fake.detach()}

    return step


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "gan", max_epochs=15, batch_size=64, lr=2e-4)
    args = parser.parse_args(argv)
    setup(args)
    t0 = time.monotonic()
    data = load_mnist(args.data_dir, download=not args.no_download)
    print(f"data: {data.source}: {len(data.train_images)} train images")

    generate, g_params = lf.functionalize(generator())
    discriminate, d_params = lf.functionalize(discriminator())
    # two optimizers (configure_optimizers returning two), betas as in DCGAN
    opt_g, opt_d = lf.optim.adam(args.lr, betas=(0.5, 0.999)), lf.optim.adam(args.lr, betas=(0.5, 0.999))
    state = lf.TrainState(
        step=torch.zeros((), dtype=torch.int64),
        params={"generator": g_params, "discriminator": d_params},
        opt_state={"generator": opt_g.init(g_params), "discriminator": opt_d.init(d_params)},
        rng=lf.random.key(args.seed),
    )
    train = lf.data.ArrayLoader((data.train_images,), batch_size=args.batch_size, seed=args.seed)
    logger = lf.loggers.CSVLogger(args.out, name="")
    checkpoint = lf.callbacks.ModelCheckpoint(logger.log_dir / "checkpoints", save_last=True)
    printer = lf.callbacks.ProgressLog(max_epochs=args.max_epochs)  # one line per epoch, terminal or not

    how = describe_jit(args)
    print(f"training an MLP GAN (generator {lf.tree.size(g_params):,} params, discriminator {lf.tree.size(d_params):,}), "
          f"two Adam optimizers lr {args.lr:g}, batch {args.batch_size}, {len(train)} steps/epoch, {args.max_epochs} epoch(s), {how}")
    state = fit(
        gan_step(generate, discriminate, opt_g, opt_d), state, train,
        max_epochs=args.max_epochs, max_steps=args.max_steps, limit_train_batches=args.limit_train_batches,
        jit=jit_arg(args), callbacks=[checkpoint, printer], loggers=[logger],
        hparams={"lr": args.lr, "batch_size": args.batch_size, "latent": LATENT, "seed": args.seed, "data": data.source},
    )
    logger.close()

    # 64 digits from fixed noise, back in [0, 1]
    g_params = lf.tree.to_device(state.params["generator"], "cpu")
    with torch.no_grad():
        samples = generate(g_params, lf.random.normal(lf.random.key(args.seed + 1), (64, LATENT)))
    samples = ((samples + 1) / 2).clamp(0, 1).view(64, 1, 28, 28)
    grid_path = logger.log_dir / "samples.png"
    # Imported here, not at the top: torchvision's import takes seconds and pulls in
    # torch._dynamo, all before the first training step.
    from torchvision.utils import save_image

    save_image(lf.loggers.image_grid(samples, nrow=8), grid_path)

    # a sanity number: how far the mean generated digit is from the mean real digit
    gap = (samples.mean(0) - data.train_images.mean(0)).abs().mean().item()
    print(f"\ntrained {int(state.step)} steps; mean |generated - real| of the average digit {gap:.4f}")
    print(f"samples     {grid_path}")
    print(f"metrics     {logger.metrics_file}")
    print(f"checkpoint  {checkpoint.last_model_path}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
