"""errors.py: every exception type lightfn defines, each reachable as lf.<Name>."""

from __future__ import annotations

import pytest

import lightfn as lf
from lightfn import errors


def test_every_exception_type_is_public_and_a_lightfn_error():
    assert set(errors.__all__) <= set(lf.__all__)
    for name in errors.__all__:
        cls = getattr(lf, name)
        assert cls is getattr(errors, name) and cls.__module__ == "lightfn.errors"
        if cls is lf.Preempted:  # not an error: a clean exit
            assert issubclass(cls, SystemExit) and lf.Preempted(None).code == 0
        else:
            assert issubclass(cls, lf.LightfnError)


def test_the_public_namespaces_keep_their_exceptions():
    assert lf.callbacks.MisconfigurationError is errors.MisconfigurationError
    assert lf.callbacks.NonFiniteLossError is errors.NonFiniteLossError
    assert lf.loggers.LoggerError is errors.LoggerError
    assert lf.optim.StateMismatchError is errors.StateMismatchError
    assert lf.optim.OptimizerConfigError is errors.OptimizerConfigError
    assert lf.data.DataError is errors.DataError


def test_state_mismatch_error_names_the_path_it_travelled():
    e = errors.StateMismatchError("expected ScaleByAdamState", ("mu",)).prefixed(0)
    assert str(e) == "opt_state[0]['mu']: expected ScaleByAdamState" and e.path == (0, "mu")
    with pytest.raises(lf.StepError):
        raise e
