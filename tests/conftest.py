import os
import pathlib

import pytest
import torch

# A persistent inductor cache shared by the test session: warm runs skip C++ rebuilds.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "lightfn-tests" / "inductor"),
)

MNIST_DIR = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "MNIST" / "raw"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles from a clean dynamo state so counters are per-test.
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield


@pytest.fixture
def mnist_dir():
    if not (MNIST_DIR / "t10k-images-idx3-ubyte").exists():
        pytest.skip("real MNIST not available at ../shared/data/MNIST/raw")
    return MNIST_DIR
