"""lf.privacy: differentially private training (DP-SGD) with lightfn's pure steps.

- :func:`dp_train_step`: an ``lf.train_step`` whose gradients are clipped per sample and
  noised (Abadi et al. 2016, as in Opacus), compiled whole like any step
  (:mod:`lightfn.privacy.dp_sgd`);
- ``lf.data.ArrayLoader(data, poisson_rate=q)``: the Poisson-sampled, fixed-shape batches
  the accounting assumes (:class:`lightfn.data.MaskedBatch`);
- :func:`epsilon` / :func:`max_steps`: the accountant, from Google's ``dp-accounting``
  (:mod:`lightfn.privacy.accountant`; ``pip install 'lightfn[privacy]'``);
- :class:`PrivacyBudget`: a callback that logs epsilon per epoch and stops ``lf.fit`` at a
  target epsilon.

A private run end to end::

    loader = lf.data.ArrayLoader((x, y), poisson_rate=256 / len(x))
    step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=1.1,
                                    expected_batch_size=loader.expected_batch_size)
    budget = lf.privacy.PrivacyBudget(noise_multiplier=1.1, sample_rate=loader.poisson_rate,
                                      delta=1e-5, target_epsilon=3.0)
    state = lf.fit(step, state, loader, max_epochs=100, callbacks=[budget])

One step, eagerly:

>>> import torch, lightfn as lf
>>> def loss_fn(p, batch):
...     x, y = batch
...     return ((x @ p["w"] - y) ** 2).mean()
>>> opt = lf.optim.sgd(0.1)
>>> state = lf.TrainState.create(params={"w": torch.zeros(3)}, optimizer=opt, seed=0)
>>> step = lf.privacy.dp_train_step(loss_fn, opt, l2_norm_clip=1.0, noise_multiplier=1.1)
>>> state, metrics = step(state, (torch.randn(8, 3), torch.randn(8)))
>>> int(state.step)
1
"""

from .accountant import ACCOUNTANTS, epsilon, max_steps
from .budget import PrivacyBudget
from .dp_sgd import NOISE_STREAM, ROW_STREAM, DPGradient, dp_train_step

__all__ = ["dp_train_step", "DPGradient", "epsilon", "max_steps", "PrivacyBudget", "ACCOUNTANTS", "ROW_STREAM", "NOISE_STREAM"]
