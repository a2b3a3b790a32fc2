"""Deploy the encoder of the MNIST autoencoder three ways and check each against eager.

    python examples/export.py                          # trains a quick encoder first
    python examples/export.py --ckpt ckpts/last.safetensors --data-dir ../shared/data/MNIST/raw

The encoder alone (784 -> 64 -> 3) is a pure function of its params; it is exported as a
``torch.export`` program (saved and reloaded as ``.pt2``), as ONNX run by onnxruntime, and
as an AOTInductor package. Each is run on the same inputs and compared with the eager
encoder: max absolute difference and latency per batch of 256. Exits non-zero if any
export disagrees with eager by more than 1e-4.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from lightfn.export import export, export_aot, export_onnx
from lightfn.predict import predict


def encoder_module() -> nn.Sequential:
    # parameter names "0.weight", "0.bias", "2.weight", "2.bias", as in the autoencoder example
    return nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 3))


def decoder_module() -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 784))


def read_images(data_dir: pathlib.Path | None, n: int, seed: int) -> torch.Tensor:
    """MNIST test images as float rows in [0, 1] (IDX format read with numpy), else noise."""
    if data_dir is not None and (data_dir / "t10k-images-idx3-ubyte").exists():
        raw = np.fromfile(data_dir / "t10k-images-idx3-ubyte", dtype=np.uint8)
        count = int.from_bytes(raw[4:8].tobytes(), "big")  # header: magic, count, rows, cols
        images = raw[16:].reshape(count, 784)[:n]
        return torch.from_numpy(images.astype(np.float32) / 255.0)
    return torch.rand(n, 784, generator=torch.Generator().manual_seed(seed))


def train_encoder(images: torch.Tensor, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """A few hundred Adam steps of the autoencoder with plain torch; returns encoder params."""
    torch.manual_seed(seed)
    enc, dec = encoder_module(), decoder_module()
    params = {"encoder": dict(enc.named_parameters()), "decoder": dict(dec.named_parameters())}
    opt = torch.optim.Adam([*params["encoder"].values(), *params["decoder"].values()], lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(len(images), (128,), generator=g)]
        z = functional_call(enc, params["encoder"], (x,))
        loss = torch.mean((functional_call(dec, params["decoder"], (z,)) - x) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"train step {step:4d}  reconstruction loss {loss.item():.4f}")
    return {k: v.detach() for k, v in params["encoder"].items()}


def load_encoder(path: pathlib.Path) -> dict[str, torch.Tensor]:
    from lightfn.checkpoint import load  # only needed when a checkpoint is given

    return load(path)["params"]["encoder"]


def latency_ms(run: Callable[[torch.Tensor], Any], x: torch.Tensor, repeats: int) -> float:
    """Median wall time of one call on a batch, after two warm-up calls."""
    with torch.no_grad():
        for _ in range(2):
            run(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=pathlib.Path, help="checkpoint written by the autoencoder example")
    parser.add_argument("--data-dir", type=pathlib.Path, help="MNIST raw IDX directory (random data otherwise)")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no checkpoint is given")
    parser.add_argument("--out-dir", type=pathlib.Path, help="where exported files go (a temp dir otherwise)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per method")
    parser.add_argument("--skip-aot", action="store_true", help="skip the AOTInductor build (tens of seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    images = read_images(args.data_dir, 2048, args.seed)
    if args.ckpt is not None and args.ckpt.exists():
        params = load_encoder(args.ckpt)
        print(f"loaded encoder params from {args.ckpt}")
    else:
        if args.ckpt is not None:
            print(f"{args.ckpt} does not exist: training a quick encoder instead")
        params = train_encoder(images, args.steps, args.seed)

    enc = encoder_module()

    def encode(x: torch.Tensor) -> torch.Tensor:
        return functional_call(enc, params, (x,))

    out_dir = args.out_dir or pathlib.Path(tempfile.mkdtemp(prefix="lightfn-export-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    x = images[:256]
    with torch.no_grad():
        expected = encode(x)
    rows: list[tuple[str, float, float]] = [("eager", 0.0, latency_ms(encode, x, args.repeats))]

    # 1. torch.export: the example batch of 1 still gives a program for any batch size
    program = export(encode, images[:1])
    torch.export.save(program, out_dir / "encoder_program.pt2")
    module = torch.export.load(out_dir / "encoder_program.pt2").module()
    with torch.no_grad():
        got = module(x)
    rows.append(("torch.export (.pt2 reloaded)", (got - expected).abs().max().item(), latency_ms(module, x, args.repeats)))

    # 2. ONNX, run by onnxruntime
    import onnxruntime

    onnx_path = export_onnx(encode, images[:1], path=out_dir / "encoder.onnx", input_names=["pixels"], output_names=["code"])
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (code,) = session.run(None, {"pixels": x.numpy()})
    onnx_run = lambda t: session.run(None, {"pixels": t.numpy()})  # noqa: E731
    rows.append(("ONNX (onnxruntime)", float(np.abs(code - expected.numpy()).max()), latency_ms(onnx_run, x, args.repeats)))

    # 3. AOTInductor: a compiled .pt2 package, loadable from Python or C++
    if not args.skip_aot:
        aot_path = export_aot(encode, images[:1], path=out_dir / "encoder_aot.pt2")
        compiled = torch._inductor.aoti_load_package(str(aot_path))
        with torch.no_grad():
            got = compiled(x)
        rows.append(("AOTInductor", (got - expected).abs().max().item(), latency_ms(compiled, x, args.repeats)))

    # the reloaded program as a batched predictor over the whole set (ragged last batch)
    codes = predict(module, images, batch_size=256, device="cpu")
    print(f"\npredict over {len(images)} images -> codes {tuple(codes.shape)}; exports in {out_dir}\n")

    print(f"{'method':<30} {'max |diff| vs eager':>20} {'ms / batch of 256':>18}")
    for name, diff, ms in rows:
        print(f"{name:<30} {diff:>20.2e} {ms:>18.3f}")
    worst = max(diff for _, diff, _ in rows)
    if worst > 1e-4:
        print(f"FAIL: an export differs from eager by {worst:.2e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
