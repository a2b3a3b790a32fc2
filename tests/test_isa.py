import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from lightfn._compile import isa as _isa

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="inductor probes ISAs by building only on x86-64")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTFN_CACHE_DIR", str(tmp_path / "lightfn"))
    return tmp_path / "lightfn"


def test_a_passing_probe_is_recorded_once_and_then_skips_the_test_builds(cache):
    from torch._inductor import cpu_vec_isa

    assert _isa.isa_options() == {}  # nothing on record yet
    cpu_vec_isa.valid_vec_isa_list()  # the probe (from inductor's own cache files when warm)
    if [str(i) for i in cpu_vec_isa.valid_vec_isa_list()] != _isa._claimed():
        pytest.skip("an ISA this CPU claims does not build here: such a machine is never recorded")
    assert _isa.remember_isa_probe() is True
    (record,) = (cache / "isa").glob("*.json")
    assert json.loads(record.read_text())["valid"] == _isa._claimed()
    assert _isa.isa_options() == {"cpp.vec_isa_ok": True}
    assert _isa.remember_isa_probe() is False  # already on record


def test_a_record_that_does_not_match_this_machine_or_is_damaged_is_ignored(cache):
    path = _isa._record_path(_isa._fingerprint())
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"fingerprint": "someone else", "valid": _isa._claimed()}))
    assert _isa.isa_options() == {}
    path.write_text(json.dumps({"fingerprint": _isa._fingerprint(), "valid": ["avx2"] + _isa._claimed()}))
    assert _isa.isa_options() == {}
    path.write_text('{"fingerprint": ')  # torn write from a tool that is not atomic
    assert _isa.isa_options() == {}


_COMPILE = """
import torch, lightfn as lf
f = lf.jit(lambda x: (x * 2).sin())
x = torch.linspace(0, 1, 8)
torch.testing.assert_close(f(x), (x * 2).sin())
"""


@pytest.mark.slow
@pytest.mark.compile
def test_a_new_inductor_cache_dir_skips_the_isa_header_builds_once_the_machine_is_on_record(tmp_path):
    # Counter, not timer: each ISA test build leaves a .load_ok marker in the inductor cache.
    # On record, the one header build per ISA is skipped; the extension checks (bf16, vnni)
    # still run, since they choose compiler flags.
    def run(name):
        inductor = tmp_path / name
        env = {**os.environ, "PYTHONPATH": str(ROOT), "LIGHTFN_CACHE_DIR": str(tmp_path / "lightfn"),
               "TORCHINDUCTOR_CACHE_DIR": str(inductor)}
        proc = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return len(list(inductor.rglob("*.load_ok")))

    first = run("first")
    if first == 0 or not list((tmp_path / "lightfn" / "isa").glob("*.json")):
        pytest.skip("this machine's probe did not pass for every ISA it claims: nothing to record")
    assert run("second") == first - len(_isa._claimed())
