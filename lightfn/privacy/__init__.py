"""lf.privacy: differentially private training (DP-SGD) with lightfn's pure steps.

:func:`dp_train_step` is an ``lf.train_step`` whose gradients are clipped per sample and
noised (Abadi et al. 2016, as in Opacus), compiled whole like any step; see
:mod:`lightfn.privacy.dp_sgd`.

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

from .dp_sgd import NOISE_STREAM, ROW_STREAM, DPGradient, dp_train_step

__all__ = ["dp_train_step", "DPGradient", "ROW_STREAM", "NOISE_STREAM"]
