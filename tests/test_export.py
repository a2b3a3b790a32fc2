"""lightfn.export: traced programs equal eager, round trips, ONNX/AOTI parity, clear errors."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightfn.errors import ExportError
from lightfn.export import export, export_aot, export_onnx

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5


def _encoder() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 3))
    return module, {k: v.detach() for k, v in module.named_parameters()}


MODULE, PARAMS = _encoder()


def apply(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return functional_call(MODULE, params, (x,))


def encode(x: torch.Tensor) -> torch.Tensor:
    return apply(PARAMS, x)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- programs


@pytest.mark.parametrize("example_batch", [1, 4])
def test_program_equals_eager_at_batch_1_7_300(example_batch):
    program = export(encode, torch.randn(example_batch, 784))
    module = program.module()
    for n in (1, 7, 300):
        x = torch.randn(n, 784)
        with torch.no_grad():
            got, want = module(x), encode(x)
        assert got.shape == (n, 3)
        assert _maxdiff(got, want) <= TOL
    # the batch dimension is one symbol ranging from 1 up, not [2, inf)
    (batch_range,) = program.range_constraints.values()
    assert batch_range.lower == 1


def test_pt2_round_trip_is_exact(tmp_path):
    program = export(encode, torch.randn(1, 784))
    torch.export.save(program, tmp_path / "enc.pt2")
    loaded = torch.export.load(tmp_path / "enc.pt2")
    x = torch.randn(300, 784)
    with torch.no_grad():
        assert torch.equal(loaded.module()(x), program.module()(x))
        assert _maxdiff(loaded.module()(x), encode(x)) <= TOL


def test_params_baked_in_as_constants():
    program = export(apply, torch.randn(5, 784), params=PARAMS)
    module = program.module()
    x = torch.randn(7, 784)
    with torch.no_grad():
        assert _maxdiff(module(x), encode(x)) <= TOL
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(user_inputs) == 1  # only x: the weights are not inputs


def test_params_as_inputs_swaps_weights():
    program = export(apply, torch.randn(1, 784), params=PARAMS, params_as_inputs=True)
    module = program.module()
    gen = torch.Generator().manual_seed(1)
    new = {k: torch.randn(v.shape, generator=gen) for k, v in PARAMS.items()}
    x = torch.randn(7, 784)
    with torch.no_grad():
        got_new, got_old = module(new, x), module(PARAMS, x)
        assert _maxdiff(got_new, apply(new, x)) <= TOL
        assert _maxdiff(got_old, encode(x)) <= TOL
        assert _maxdiff(got_new, got_old) > 1e-2  # the swap really changed the weights
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(names) == 5 and any("weight" in n for n in names)


def test_pytree_inputs_and_outputs_with_batch_one_example():
    w = torch.randn(4, 3)

    def fn(batch, scale):
        h = batch["a"] @ w + batch["b"]
        return {"h": h, "pair": (h * scale, scale.sum(1))}

    example = ({"a": torch.randn(1, 4), "b": torch.randn(1, 3)}, torch.randn(1, 3))
    module = export(fn, *example).module()
    for n in (1, 6):
        args = ({"a": torch.randn(n, 4), "b": torch.randn(n, 3)}, torch.randn(n, 3))
        got, want = module(*args), fn(*args)
        assert _maxdiff(got["h"], want["h"]) <= TOL
        assert _maxdiff(got["pair"][0], want["pair"][0]) <= TOL
        assert _maxdiff(got["pair"][1], want["pair"][1]) <= TOL


def test_static_batch_when_dynamic_batch_false():
    module = export(encode, torch.randn(4, 784), dynamic_batch=False).module()
    with torch.no_grad():
        assert _maxdiff(module(x := torch.randn(4, 784)), encode(x)) <= TOL
    with pytest.raises(Exception):
        module(torch.randn(5, 784))


# ----------------------------------------------------------------------------- ONNX / AOTI


def test_onnx_matches_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    path = export_onnx(encode, torch.randn(1, 784), path=tmp_path / "enc.onnx", input_names=["x"], output_names=["z"])
    assert path == tmp_path / "enc.onnx" and path.exists()
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 300):
        x = torch.randn(n, 784)
        (z,) = session.run(["z"], {"x": x.numpy()})
        with torch.no_grad():
            assert _maxdiff(torch.from_numpy(z), encode(x)) <= TOL


def test_onnx_missing_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # makes `import onnxscript` fail
    with pytest.raises(ExportError, match=r"pip install 'lightfn\[onnx\]'") as info:
        export_onnx(encode, torch.randn(2, 784), path=tmp_path / "enc.onnx")
    assert "onnxscript" in str(info.value)
    assert not (tmp_path / "enc.onnx").exists()


def test_export_aot_refuses_other_suffix(tmp_path):
    with pytest.raises(ExportError, match=r"\.pt2"):
        export_aot(encode, torch.randn(2, 784), path=tmp_path / "enc.so")


@pytest.mark.compile
@pytest.mark.slow
def test_aot_package_loads_and_matches(tmp_path):
    path = export_aot(encode, torch.randn(1, 784), path=tmp_path / "enc.pt2")
    assert path.exists()
    compiled = torch._inductor.aoti_load_package(str(path))
    for n in (1, 7, 300):
        x = torch.randn(n, 784)
        with torch.no_grad():
            assert _maxdiff(compiled(x), encode(x)) <= TOL


# ----------------------------------------------------------------------------- bad input


def _branchy(x):
    if x.sum() > 0:
        return x
    return -x


def _item(x):
    return x * x.sum().item()


def _printing(x):
    print("shape", x.shape)
    return x * 2


SEEN: list[torch.Tensor] = []


def _appending(x):
    SEEN.append(x)
    return x * 2


def _fixed_batch(x):
    return x.view(2, -1)


@pytest.mark.parametrize(
    "fn, words",
    [
        (_branchy, ["control flow", "torch.where", "torch.cond", "`if x.sum() > 0:`"]),
        (_item, [".item()", "tensor"]),
        (_printing, ["printed", "side effects", "Move them out"]),
        (_appending, ["'SEEN'", "list", "side effects"]),
        (_fixed_batch, ["batch size", "dynamic_batch=False"]),
    ],
    ids=["branch", "item", "print", "append", "fixed-batch"],
)
def test_untraceable_functions_raise_short_export_error(fn, words, capsys):
    SEEN.clear()
    with pytest.raises(ExportError) as info:
        export(fn, torch.randn(3, 4))
    msg = str(info.value)
    for w in words:
        assert w in msg, msg
    assert fn.__name__ in msg
    assert len(msg.splitlines()) <= 2 and len(msg) < 600, msg
    if fn in (_branchy, _fixed_batch):
        assert info.value.__cause__ is not None  # torch's full report stays reachable
    out = capsys.readouterr()
    assert "def forward" not in out.err  # torch's partial-graph dump is kept out of the way


def test_data_dependent_branch_under_strict_tracing():
    with pytest.raises(ExportError, match="torch.cond"):
        export(_branchy, torch.randn(3, 4), strict=True)


@pytest.mark.parametrize(
    "args, where, kind",
    [
        ((torch.randn(3, 4), 3), "example_args[1]", "int"),
        (({"a": torch.randn(3, 4), "b": "text"},), "example_args[0]['b']", "str"),
        (([torch.randn(3, 4), 0.5],), "example_args[0][1]", "float"),
    ],
)
def test_non_tensor_example_inputs_are_named(args, where, kind):
    with pytest.raises(ExportError) as info:
        export(lambda *a: a[0], *args)
    assert where in str(info.value) and kind in str(info.value) and "not a tensor" in str(info.value)


def test_non_tensor_params_are_named():
    with pytest.raises(ExportError, match=r"params\['scale'\] has type float"):
        export(lambda p, x: x * p["scale"], torch.randn(2, 3), params={"scale": 2.0})


def test_batch_sizes_must_agree():
    with pytest.raises(ExportError, match=r"example_args\[1\] has leading size 5") as info:
        export(lambda x, y: x.sum() + y.sum(), torch.randn(3, 4), torch.randn(5, 4))
    assert "dynamic_batch=False" in str(info.value)


def test_params_as_inputs_needs_params():
    with pytest.raises(ExportError, match="params="):
        export(encode, torch.randn(2, 784), params_as_inputs=True)


def test_empty_example_batch():
    with pytest.raises(ExportError, match="empty"):
        export(encode, torch.randn(0, 784))


# ----------------------------------------------------------------------------- example


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the repository goes after any existing entries, so an installed lightfn still wins
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    return env


@pytest.mark.slow
def test_example_runs(tmp_path):
    cmd = [sys.executable, str(ROOT / "examples" / "export.py"), "--steps", "20", "--repeats", "2", "--skip-aot", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ONNX (onnxruntime)" in proc.stdout and "torch.export" in proc.stdout
    assert (tmp_path / "encoder.onnx").exists() and (tmp_path / "encoder_program.pt2").exists()


def test_example_loads_a_checkpoint(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    from lightfn.checkpoint import save

    ckpt = save(tmp_path / "last.safetensors", {"params": {"encoder": PARAMS, "decoder": {"w": torch.zeros(2)}}, "step": torch.tensor(3)})
    spec = importlib.util.spec_from_file_location("export_example", ROOT / "examples" / "export.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rc = example.main(["--ckpt", str(ckpt), "--repeats", "1", "--skip-aot", "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "loaded encoder params" in out and "train step" not in out
