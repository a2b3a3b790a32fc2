import logging
import os
import pathlib
import subprocess
import sys

import pytest

from lightfn import _quiet

ROOT = pathlib.Path(__file__).resolve().parents[1]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_only_the_no_cuda_runtime_message_is_dropped_and_only_inside_the_block(monkeypatch):
    # Pretend cpp_extension is not imported yet (the only time the message can appear).
    monkeypatch.delitem(sys.modules, "torch.utils.cpp_extension", raising=False)
    logger = logging.getLogger("torch.utils.cpp_extension")
    # Earlier tests may have compiled (torch's logging then sets this logger's level): make
    # warnings reach our handler whatever ran before.
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(logger, "level", logging.WARNING)
    records = _Records()
    logger.addHandler(records)
    filters_before = list(logger.filters)
    try:
        with _quiet.compile_messages_quieted():
            logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
            logger.warning("some other warning")
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    finally:
        logger.removeHandler(records)
    assert records.messages == ["some other warning", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"]
    assert logger.filters == filters_before


_COMPILE = """
import sys, torch, lightfn as lf
f = lf.jit(lambda x: (x * 2).sin())
x = torch.linspace(0, 1, 8)
torch.testing.assert_close(f(x), (x * 2).sin())
assert "torch.utils.cpp_extension" in sys.modules  # the compile did import it
import logging
logging.getLogger("torch.utils.cpp_extension").warning("later warning")  # not hidden after the call
"""


@pytest.mark.compile
@pytest.mark.slow
def test_compiled_run_on_cpu_does_not_print_no_cuda_runtime():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    # Control: does this machine print the message at all (CUDA build, a toolkit, no GPU)?
    probe = subprocess.run([sys.executable, "-c", "import torch.utils.cpp_extension"], env=env, capture_output=True, text=True, timeout=120)
    if "No CUDA runtime is found" not in probe.stderr:
        pytest.skip("this machine's torch does not print the message (no CUDA toolkit, a GPU, or a CPU build)")
    run = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "No CUDA runtime is found" not in run.stderr
    assert "later warning" in run.stderr
