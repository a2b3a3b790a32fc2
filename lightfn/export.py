"""Export traced inference functions: ``torch.export``, ONNX and AOTInductor.

Users train with lightfn and deploy without it. An inference function is any pure
function of tensors, usually a closure over trained params (``lambda x: apply(params, x)``)
or a sub-model such as an encoder alone. :func:`export` traces it with ``torch.export``
into an :class:`torch.export.ExportedProgram` whose leading (batch) dimension is dynamic
from 1 up; :func:`export_onnx` and :func:`export_aot` turn that program into an ONNX file
or an AOTInductor package that run without Python lightfn (or without Python at all).

Tracing runs the function once on example inputs, so it must be one graph for every
input: branching on a tensor's *value*, ``.item()`` and Python side effects (``print``,
appending to a list) are refused with an :class:`~lightfn.errors.ExportError` that says
what to change. TorchScript (Lightning's ``to_torchscript``) is deprecated upstream; these
are its replacements.
"""

from __future__ import annotations

import functools
import importlib
import os
import pathlib
from collections.abc import Callable
from typing import Any

import torch

from . import tree
from ._diagnostics import first_line
from ._quiet import compile_messages_quieted
from ._export_diagnostics import check_runs_at_batch_one, check_tensors, explain_trace_failure, refuse_item, watch_side_effects
from .errors import ExportError

__all__ = ["export", "export_onnx", "export_aot"]

BATCH = "batch"  # name of the dynamic leading dimension (also the ONNX axis name)


def export(
    fn: Callable[..., Any],
    *example_args: Any,
    params: tree.PyTree = None,
    params_as_inputs: bool = False,
    dynamic_batch: bool = True,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Trace ``fn(*example_args)`` (or ``fn(params, *example_args)``) with ``torch.export``.

    Args:
        fn: a pure function of tensors (pytrees of tensors in, pytrees of tensors out).
            Tensors it closes over are baked into the program as constants.
        example_args: example inputs, each a tensor or a pytree of tensors. Their leading
            dimension is the batch; any batch size works, 1 included.
        params: if given, ``fn(params, *args)`` is the signature and ``params`` (a pytree
            of tensors) is baked in as constants, or, with ``params_as_inputs=True``,
            becomes the program's first input so weights can be swapped without
            re-exporting: ``program.module()(other_params, x)``.
        dynamic_batch: make dim 0 of every example input one shared dynamic dimension
            named ``"batch"`` with range ``[1, inf)``. ``False`` exports the example's
            exact shapes.
        strict: use TorchDynamo's bytecode tracer (``strict=True``) instead of running
            ``fn`` in Python on fake tensors (the default, which also detects ``print``
            and container mutation inside ``fn``).

    Returns:
        The program. Call it with ``program.module()(x)``; save and load it with the
        standard functions, exact round trip, no lightfn needed on the loading side::

            program = lf.export(lambda x: apply(params, x), torch.randn(1, 784))
            torch.export.save(program, "encoder.pt2")
            program = torch.export.load("encoder.pt2")
            z = program.module()(torch.randn(300, 784))

    Raises:
        ExportError: ``fn`` cannot be traced (data-dependent control flow, ``.item()``,
            side effects, a batch size fixed in the code), or an example input is not a
            tensor; the message says why and what to change, the torch error is chained.
    """
    check_tensors(example_args, "example_args")
    if params_as_inputs and params is None:
        raise ExportError("params_as_inputs=True lifts params to program inputs: pass them as params=..., with fn(params, *args)")
    if params is not None:
        check_tensors(params, "params")
    trace_args, batch_was_one = _trace_args(example_args, dynamic_batch)

    if params is None:
        module, inputs = _Call(fn), tuple(trace_args)
    elif params_as_inputs:
        module, inputs = _CallWithParams(fn), (params, *trace_args)
    else:
        module, inputs = _Call(functools.partial(fn, params)), tuple(trace_args)

    dynamic_shapes = None
    if dynamic_batch:
        dim = torch.export.Dim(BATCH, min=1)
        arg_shapes = tuple(tree.map(lambda t: {0: dim} if t.ndim >= 1 else None, a) for a in trace_args)
        # dynamic_shapes mirrors forward's signature: forward(params, *args) takes
        # (params_spec, args_spec), forward(*args) takes (args_spec,)
        if isinstance(module, _CallWithParams):
            dynamic_shapes = (tree.map(lambda _: None, params), arg_shapes)
        else:
            dynamic_shapes = (arg_shapes,)

    program = _trace(fn, module, inputs, dynamic_shapes, strict)
    refuse_item(fn, program)
    if batch_was_one:
        check_runs_at_batch_one(fn, program, (params, *example_args) if isinstance(module, _CallWithParams) else example_args)
    return program


def export_onnx(
    fn: Callable[..., Any],
    *example_args: Any,
    path: str | os.PathLike[str],
    params: tree.PyTree = None,
    dynamic_batch: bool = True,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset_version: int | None = None,
) -> pathlib.Path:
    """Export ``fn`` to an ONNX file at ``path`` (params baked in); returns the path.

    Traces with :func:`export` (same arguments, same errors), then converts with
    ``torch.onnx.export(..., dynamo=True)``. With ``dynamic_batch`` the inputs' and
    outputs' leading axis is the named symbolic axis ``"batch"``. Models over 2 GB keep
    their weights in a ``.data`` file next to ``path``. ``input_names``/``output_names``
    name the flattened input/output tensors (torch's names otherwise). Run it with
    onnxruntime::

        sess = onnxruntime.InferenceSession(str(path))
        (z,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})

    Needs the optional extra ``pip install 'lightfn[onnx]'`` (onnx, onnxscript, onnxruntime).
    """
    _require("export_onnx", "onnx", "onnxscript")
    import onnx

    path = pathlib.Path(path)
    program = export(fn, *example_args, params=params, dynamic_batch=dynamic_batch)
    try:
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            verbose=False,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
        )
    except Exception as e:
        raise ExportError(f"torch.onnx could not convert the exported program: {first_line(e)}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(str(path))
    if dynamic_batch:
        # torch names the axis after its internal symbol (e.g. "s10"); give it a stable name
        # so runtimes and readers can refer to it.
        symbol = _batch_symbol(program)
        if symbol is not None and symbol != BATCH:
            model = onnx.load(str(path), load_external_data=False)
            for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
                for d in value.type.tensor_type.shape.dim:
                    if d.dim_param == symbol:
                        d.dim_param = BATCH
            onnx.save(model, str(path))
    return path


def export_aot(
    fn: Callable[..., Any],
    *example_args: Any,
    path: str | os.PathLike[str],
    params: tree.PyTree = None,
    dynamic_batch: bool = True,
) -> pathlib.Path:
    """Compile ``fn`` ahead of time with AOTInductor into a ``.pt2`` package; returns its path.

    Traces with :func:`export` (same arguments, same errors), then builds a shared library
    with ``torch._inductor.aoti_compile_and_package`` (needs a C++ compiler; tens of
    seconds). The package runs without lightfn, from Python::

        model = torch._inductor.aoti_load_package("encoder.pt2")
        z = model(x)            # same arguments as fn (pytrees allowed)

    or from C++ with ``torch::inductor::AOTIModelPackageLoader("encoder.pt2").run(inputs)``
    (header ``torch/csrc/inductor/aoti_package/model_package_loader.h``, libtorch only).
    """
    path = pathlib.Path(path)
    if path.suffix != ".pt2":
        raise ExportError(f"export_aot writes a .pt2 package; got path {str(path)!r}: use a name ending in .pt2")
    program = export(fn, *example_args, params=params, dynamic_batch=dynamic_batch)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with compile_messages_quieted():
            out = torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as e:
        raise ExportError(f"AOTInductor could not compile the program (is a C++ compiler installed?): {first_line(e)}") from e
    return pathlib.Path(out)


# ----------------------------------------------------------------------------- tracing


class _Call(torch.nn.Module):
    """torch.export traces modules; this one's forward is ``fn(*args)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class _CallWithParams(_Call):
    """forward is ``fn(params, *args)``: params are a named program input."""

    def forward(self, params: Any, *args: Any) -> Any:  # type: ignore[override]
        return self.fn(params, *args)


def _trace_args(example_args: tuple[Any, ...], dynamic_batch: bool) -> tuple[tuple[Any, ...], bool]:
    """The arguments to trace with, and whether the example batch was 1.

    torch.export treats sizes 0 and 1 as constants while tracing, so a batch of 1 cannot
    be marked dynamic: trace with the rows repeated to 2 instead (then check batch 1 runs).
    """
    if not dynamic_batch:
        return example_args, False
    sized = [(p, t) for p, t in tree.leaves_with_path(example_args) if t.ndim >= 1]
    if not sized:
        raise ExportError("dynamic_batch=True needs at least one example input with a leading (batch) dimension; pass dynamic_batch=False")
    first_path, first = sized[0]
    for p, t in sized[1:]:
        if t.shape[0] != first.shape[0]:
            raise ExportError(
                f"with dynamic_batch=True every example input shares one batch size, but "
                f"{tree.keystr(p, 'example_args')} has leading size {t.shape[0]} and "
                f"{tree.keystr(first_path, 'example_args')} has {first.shape[0]}. Close over tensors "
                "that are not batched (lambda x: fn(x, table)), or pass dynamic_batch=False."
            )
    n = first.shape[0]
    if n == 0:
        raise ExportError(f"the example batch is empty ({tree.keystr(first_path, 'example_args')} has shape {tuple(first.shape)}); give at least one row")
    if n > 1:
        return example_args, False
    return tree.map(lambda t: torch.cat([t, t]) if t.ndim >= 1 else t, example_args), True


def _trace(fn: Any, module: torch.nn.Module, inputs: tuple[Any, ...], dynamic_shapes: Any, strict: bool) -> torch.export.ExportedProgram:
    with torch.no_grad(), watch_side_effects(fn):
        try:
            return torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes, strict=strict)
        except Exception as e:
            raise ExportError(explain_trace_failure(fn, e, strict)) from e


def _batch_symbol(program: torch.export.ExportedProgram) -> str | None:
    """The symbol torch gave the dynamic batch dimension, from the first batched user input."""
    user_inputs = {s.arg.name for s in program.graph_signature.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.ndim >= 1 and isinstance(val.shape[0], torch.SymInt):
                return str(val.shape[0])
    return None


def _require(what: str, *modules: str) -> None:
    missing = []
    for m in modules:
        try:
            importlib.import_module(m)
        except ImportError:
            missing.append(m)
    if missing:
        raise ExportError(f"{what} needs the optional package(s) {', '.join(missing)}: pip install 'lightfn[onnx]'")
