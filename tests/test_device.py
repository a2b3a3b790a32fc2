"""_device.py: the one rule turning "auto", None, a name or a device into a torch.device."""

from __future__ import annotations

import pytest
import torch

import lightfn as lf
from lightfn._device import default_device, resolve_device


def test_auto_and_none_pick_the_default_device():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert default_device().type == expected
    assert resolve_device("auto") == resolve_device(None) == default_device()
    assert resolve_device("cpu") == resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_a_name_that_is_no_device_says_what_is_accepted():
    with pytest.raises(lf.DeviceError, match=r"device='gpu0' is not a device .*use 'auto', 'cpu', 'cuda'") as info:
        resolve_device("gpu0")
    assert isinstance(info.value, ValueError)
    with pytest.raises(lf.DistributedError, match="is not a device"):
        resolve_device("gpu0", error=lf.DistributedError)


def test_fit_and_the_single_process_mesh_ask_it():
    step = lf.train_step(lambda p, b: (p["w"] * b).sum(), lf.optim.sgd(0.1))
    state = lf.TrainState.create(params={"w": torch.ones(2)}, optimizer=step.optimizer)
    with pytest.raises(lf.FitError, match=r"device='gpu0' is not a device .*use 'auto'"):
        lf.fit(step, state, [torch.ones(2)], max_steps=1, device="gpu0", progress=False)
    assert lf.distributed.single_process_mesh().device == default_device()
    with pytest.raises(lf.DistributedError, match="is not a device"):
        lf.distributed.single_process_mesh("gpu0")
