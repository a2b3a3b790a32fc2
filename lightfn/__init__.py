"""lightfn: a functional, JAX-style trainer for PyTorch.

A model is a pure function ``loss_fn(params, batch)``; a training step is a pure function
``(state, batch) -> (state, metrics)`` compiled whole; all state is one pytree saved as
safetensors. See README.md for the quickstart and the Lightning -> lightfn table.
"""

from __future__ import annotations

from . import callbacks, data, distributed, errors, loggers, metrics, optim, privacy, random, tree
from .errors import *  # noqa: F403 (every exception type, listed in errors.__all__)
from .checkpoint import load, read_metadata, save
from .ensemble import ensemble
from .export import export, export_aot, export_onnx
from .fit import fit, test, validate
from .module import functionalize
from .freezing import combine, partition
from .per_sample import per_sample_grad
from .predict import predict
from .state import LossScale, TrainState
from .summary import summary
from .step import EvalStep, TrainStep, eval_step, train_step
from .transforms import grad, jit, value_and_grad, vmap

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # modules
    "tree",
    "random",
    "optim",
    "data",
    "callbacks",
    "loggers",
    "metrics",
    "distributed",
    "privacy",
    # models and transforms
    "functionalize",
    "summary",
    "grad",
    "value_and_grad",
    "vmap",
    "jit",
    # functional superpowers
    "ensemble",
    "per_sample_grad",
    # state and steps
    "TrainState",
    "LossScale",
    "TrainStep",
    "EvalStep",
    "train_step",
    "eval_step",
    "partition",
    "combine",
    # the loop
    "fit",
    "validate",
    "test",
    # checkpoints
    "save",
    "load",
    "read_metadata",
    # inference
    "export",
    "export_onnx",
    "export_aot",
    "predict",
    # errors: every exception type lightfn raises
    *errors.__all__,
]
