"""MAML on sine waves (Finn et al. 2017, section 5.1): meta-learning with gradients of gradients.

    python examples/maml_sine.py
    python examples/maml_sine.py --inner-steps 5 --no-jit

A task is a sine wave ``y = A sin(x - phase)``, ``A`` in [0.1, 5], ``phase`` in [0, pi], seen
through K=10 points ``x`` in [-5, 5]. MAML learns initial params for a 1-40-40-1 ReLU MLP
such that ``--inner-steps`` plain SGD steps (step size alpha=0.01) on a task's K support
points fit that task's other points (the query set). The meta-loss is the query MSE *after*
adaptation, and its gradient goes back through the inner SGD steps (second order).

The lightfn way: the inner loop is ``lf.grad`` of the support loss and an
``lf.optim.sgd(alpha)`` update, written as ordinary functions of params (:func:`adapt`);
``lf.vmap`` runs it for every task of a meta-batch at once (:func:`maml_loss`); and the
outer loop is a plain ``lf.train_step(maml_loss, adam)`` driven by ``lf.fit``, where a
batch is a batch of tasks, compiled whole by ``lf.jit`` (``torch.func`` transforms nest, so
the outer gradient differentiates the inner ones). Nothing else is needed: no
``create_graph=True``, no ``higher``-style patched modules.

At the end both MAML and a baseline are adapted to held-out tasks, as in the paper's
Figure 2: the baseline is the same MLP pretrained on all training tasks jointly (one
regression on every point of every task: it can only learn the mean wave, ~0), then
fine-tuned with the same inner SGD steps. Printed: the held-out query MSE after 0, 1, 5
and 10 steps for both.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

import lightfn as lf
from lightfn.fit import fit

from _common import describe_jit, example_parser, jit_arg, setup

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)


def sine_tasks(n: int, shots: int, queries: int, seed: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """``n`` tasks: ``(x_support, y_support, x_query, y_query)``, shapes ``(n, shots, 1)`` and
    ``(n, queries, 1)``; a pure function of ``seed``."""
    g = torch.Generator().manual_seed(seed)
    amplitude = torch.empty(n, 1, 1, dtype=dtype).uniform_(*AMPLITUDE, generator=g)
    phase = torch.empty(n, 1, 1, dtype=dtype).uniform_(*PHASE, generator=g)
    xs = torch.empty(n, shots, 1, dtype=dtype).uniform_(*X_RANGE, generator=g)
    xq = torch.empty(n, queries, 1, dtype=dtype).uniform_(*X_RANGE, generator=g)
    return xs, amplitude * torch.sin(xs - phase), xq, amplitude * torch.sin(xq - phase)


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))


def mse(apply, params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (apply(params, x) - y).square().mean()


def adapt(apply, params, x: torch.Tensor, y: torch.Tensor, *, steps: int, alpha: float):
    """``steps`` SGD steps of size ``alpha`` on one task's support set: differentiable in ``params``.

    The update is ``lf.optim.sgd``'s, applied functionally, so the result is a function of
    the initial params that ``lf.grad`` can differentiate through (second order).
    """
    inner = lf.optim.sgd(alpha)
    opt_state = inner.init(params)
    support_grad = lf.grad(lambda p: mse(apply, p, x, y))
    for _ in range(steps):
        updates, opt_state = inner.update(support_grad(params), opt_state, params)
        params = lf.optim.apply_updates(params, updates)
    return params


def maml_loss(apply, params, tasks, *, steps: int, alpha: float) -> torch.Tensor:
    """The meta-loss: the mean over tasks of the query MSE after adapting on the support set."""

    def one_task(xs, ys, xq, yq):
        return mse(apply, adapt(apply, params, xs, ys, steps=steps, alpha=alpha), xq, yq)

    return lf.vmap(one_task)(*tasks).mean()


def adapted_mse(apply, params, tasks, *, steps: int, alpha: float) -> float:
    """Held-out query MSE averaged over ``tasks`` after ``steps`` inner steps (no meta-gradient)."""
    return float(maml_loss(apply, lf.tree.map(torch.Tensor.detach, params), tasks, steps=steps, alpha=alpha))


def main(argv: list[str] | None = None) -> int:
    parser = example_parser(__doc__.splitlines()[0], "maml_sine", max_epochs=6, batch_size=25, lr=1e-3)
    parser.add_argument("--tasks", type=int, default=25_000, help="training tasks in the pool, reshuffled each epoch (default 25000)")
    parser.add_argument("--shots", type=int, default=10, help="K, support (and training query) points per task (default 10)")
    parser.add_argument("--inner-steps", type=int, default=1, help="inner SGD steps in meta-training (default 1, as the paper)")
    parser.add_argument("--alpha", type=float, default=0.01, help="inner SGD step size (default 0.01)")
    parser.add_argument("--eval-tasks", type=int, default=1000, help="held-out tasks for the final comparison (default 1000)")
    args = parser.parse_args(argv)
    setup(args)
    t0 = time.monotonic()

    # training pool, validation and held-out test tasks from disjoint seeds
    train_tasks = sine_tasks(args.tasks, args.shots, args.shots, seed=args.seed)
    val_tasks = sine_tasks(200, args.shots, 100, seed=args.seed + 1)
    test_tasks = sine_tasks(args.eval_tasks, args.shots, 100, seed=args.seed + 2)
    apply, init_params = lf.functionalize(mlp())
    steps, alpha = args.inner_steps, args.alpha

    def meta_loss_fn(params, tasks):
        return maml_loss(apply, params, tasks, steps=steps, alpha=alpha)

    def joint_loss_fn(params, tasks):
        # the baseline: every point of every task in one regression, no adaptation
        xs, ys, xq, yq = tasks
        return mse(apply, params, torch.cat([xs, xq], 1), torch.cat([ys, yq], 1))

    def eval_fn(params, tasks):
        # validation: query MSE after the training inner steps (grad ignores eval's no_grad)
        return maml_loss(apply, params, tasks, steps=steps, alpha=alpha)

    how = describe_jit(args)
    train = lf.data.ArrayLoader(train_tasks, batch_size=args.batch_size, seed=args.seed)
    val = lf.data.ArrayLoader(val_tasks, batch_size=200, shuffle=False, drop_last=False)
    common = dict(max_epochs=args.max_epochs, max_steps=args.max_steps, limit_train_batches=args.limit_train_batches,
                  limit_val_batches=args.limit_val_batches, jit=jit_arg(args), summary=False)
    print(f"MAML: 1-40-40-1 MLP ({lf.tree.size(init_params):,} params), {args.shots}-shot sine tasks, {steps} inner SGD "
          f"step(s) of {alpha:g}, meta-batch {args.batch_size} tasks, Adam lr {args.lr:g}, {len(train)} meta-steps/epoch, "
          f"{args.max_epochs} epoch(s), {how}")

    results = {}
    for name, loss_fn in (("maml", meta_loss_fn), ("baseline", joint_loss_fn)):
        opt = lf.optim.adam(args.lr)
        state = lf.TrainState.create(params=init_params, optimizer=opt, seed=args.seed)
        logger = lf.loggers.CSVLogger(args.out / name, name="")
        if name == "baseline":
            print("baseline: the same MLP pretrained on all tasks jointly (plain regression), same steps")
        t = time.monotonic()
        state = fit(lf.train_step(loss_fn, opt), state, train, val_data=val, eval_step=lf.eval_step(eval_fn),
                    callbacks=[lf.callbacks.ProgressLog(max_epochs=args.max_epochs)], loggers=[logger], **common)
        logger.close()
        params = lf.tree.to_device(state.params, "cpu")
        results[name] = {k: adapted_mse(apply, params, test_tasks, steps=k, alpha=alpha) for k in (0, 1, 5, 10)}
        print(f"{name}: {int(state.step)} steps in {time.monotonic() - t:.1f} s; metrics: {logger.metrics_file}")

    print(f"\nheld-out query MSE on {args.eval_tasks} new tasks ({args.shots} support points, 100 query points each), "
          f"after k SGD steps of {alpha:g} on the support set:")
    print(f"  {'k':>3}  {'MAML':>8}  {'pretrained':>10}")
    for k in (0, 1, 5, 10):
        print(f"  {k:>3}  {results['maml'][k]:8.4f}  {results['baseline'][k]:10.4f}")
    print(f"total {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
