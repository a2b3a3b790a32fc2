"""What every benchmark script shares: data, step timing, the FLOP floor, memory, output.

Timing rule (all scripts): a system first runs ``warmup`` steps (compilation, caches and
allocator warm-up happen there and are never timed), then ``repeats`` windows of
``window`` steps each; the reported time per step is the median over windows of
``window time / window``. Devices are synchronized only at window boundaries, so an
asynchronous system keeps its overlap of host and device work, as a user would see it.

CPU time per step (process time, all threads) is recorded too: on a machine shared with
other jobs, wall time measures the neighbours as well, CPU time much less so.

Torch is imported lazily: a JAX-only probe process then measures JAX's memory, not torch's.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
DEFAULT_DATA_DIR = pathlib.Path("../shared/data/MNIST/raw")


# ----------------------------------------------------------------------------- arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes (each script adds its own)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--data-dir", type=pathlib.Path, default=DEFAULT_DATA_DIR,
                   help="folder with MNIST IDX files (default ../shared/data/MNIST/raw; synthetic data if absent)")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps before timing (default 100)")
    p.add_argument("--steps", type=int, default=200, help="steps per timed window (default 200)")
    p.add_argument("--repeats", type=int, default=7, help="timed windows; the median is reported (default 7)")
    p.add_argument("--quick", action="store_true", help="smoke-test settings: a handful of steps, one repeat")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu or cuda")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and XLA (default: their own defaults, all cores)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="JSON output path (default benchmarks/results/<name>.json)")
    return p


def apply_quick(args: argparse.Namespace) -> argparse.Namespace:
    """Apply ``--quick`` and ``--threads`` (call before anything imports JAX)."""
    if args.quick:
        args.warmup, args.steps, args.repeats = 3, 5, 2
    if args.threads is not None:
        set_threads(args.threads)
    return args


def set_threads(n: int) -> None:
    """Limit torch (now) and XLA (when JAX is imported later, also in probes) to ``n`` threads."""
    import torch

    torch.set_num_threads(n)
    os.environ["LIGHTFN_BENCH_THREADS"] = str(n)
    if n == 1:
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1".strip()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


# ----------------------------------------------------------------------------- data


def _read_idx(path: pathlib.Path) -> np.ndarray:
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_images(data_dir: pathlib.Path, *, synthetic_n: int = 10_000) -> tuple[np.ndarray, np.ndarray, str]:
    """MNIST images as float32 ``(N, 784)`` in [0, 1] and int64 labels, plus where they came from.

    Reads the train IDX files if present, else the test set; without either, uniform random
    data of the same shape (the timings do not depend on the pixel values).
    """
    for prefix in ("train", "t10k"):
        for suffix in ("", ".gz"):
            img, lab = data_dir / f"{prefix}-images-idx3-ubyte{suffix}", data_dir / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                x = _read_idx(img).reshape(-1, 784).astype(np.float32) / 255.0
                return x, _read_idx(lab).astype(np.int64), f"MNIST {prefix} ({len(x)} images) from {data_dir}"
    rng = np.random.default_rng(0)
    x = rng.random((synthetic_n, 784), dtype=np.float32)
    y = rng.integers(0, 10, synthetic_n).astype(np.int64)
    return x, y, f"synthetic uniform data ({synthetic_n} x 784): no MNIST IDX files in {data_dir}"


# ----------------------------------------------------------------------------- timing


class StepClock:
    """Counts steps and timestamps window boundaries; see the module docstring.

    Call :meth:`tick` after every step (or ``tick(n)`` after a call that ran ``n`` steps);
    it returns True once warm-up and all windows are done. ``sync`` is called only at
    window boundaries (e.g. ``torch.cuda.synchronize`` or JAX's ``block_until_ready``).
    """

    def __init__(self, *, warmup: int, window: int, repeats: int, sync: Callable[[], None] | None = None) -> None:
        # at least one untimed step: the first window needs a start mark after a step
        self.warmup, self.window, self.repeats, self.sync = max(1, warmup), max(1, window), max(1, repeats), sync
        self.steps = 0
        self._marks: list[tuple[int, float, float]] = []

    @property
    def total_steps(self) -> int:
        return self.warmup + self.window * self.repeats

    def tick(self, n: int = 1) -> bool:
        before = self.steps
        self.steps += n
        w, start = self.window, self.warmup
        if self.steps >= start and (before < start or (self.steps - start) // w > (before - start) // w):
            if self.sync is not None:
                self.sync()
            self._marks.append((self.steps, time.perf_counter(), time.process_time()))
        return self.done

    @property
    def done(self) -> bool:
        return len(self._marks) > self.repeats

    def per_step_s(self, clock: int = 1) -> list[float]:
        """Seconds per step of each timed window: wall time (``clock=1``) or CPU time (2)."""
        m = self._marks
        return [(b[clock] - a[clock]) / (b[0] - a[0]) for a, b in zip(m, m[1:]) if b[0] > a[0]]

    def median_cpu_us(self) -> float:
        """Median CPU time (all threads of this process) per step: robust to neighbours on a
        shared machine, but it misses device time and counts spinning threads."""
        return statistics.median(self.per_step_s(2)) * 1e6

    def median_us(self) -> float:
        w = self.per_step_s()
        if not w:
            raise RuntimeError("no timed window: run more steps than warmup")
        return statistics.median(w) * 1e6


def time_loop(step: Callable[[], Any], clock: StepClock) -> StepClock:
    """Call ``step()`` until ``clock`` is done."""
    while not clock.done:
        step()
        clock.tick()
    return clock


# ----------------------------------------------------------------------------- FLOPs


def mlp_train_flops(dims: Sequence[int], batch: int) -> int:
    """FLOPs of one training step of an MLP with layer widths ``dims`` (matmuls only).

    Forward ``2*B*i*o`` per layer; backward ``2*B*i*o`` for the weight gradient plus
    ``2*B*i*o`` for the input gradient, except for the first layer (its input needs none).
    Bias, activation, loss and Adam are element-wise and ignored (they are < 1% here).
    """
    total = 0
    for k, (i, o) in enumerate(zip(dims, dims[1:])):
        total += (4 if k == 0 else 6) * batch * i * o
    return total


def sgemm_flops_per_s(n: int = 1024, repeats: int = 5) -> float:
    """The machine's float32 matmul rate (FLOP/s) on an ``n x n`` product: the best of repeats.

    The best, not the median: the floor is what the hardware can do, and on a shared
    machine a slow repeat measures the neighbours.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    inner = max(1, int(2e9 // (2 * n**3)))  # about 2 GFLOP per timed repeat
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        rates.append(2 * n**3 * inner / (time.perf_counter() - t0))
    return max(rates)


# ----------------------------------------------------------------------------- memory


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# glibc serves allocations of at least this size with their own mapping when set in the
# environment at process start: freed tensors then leave the resident set at once.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def peak_step_bytes(fn: Callable[[], Any], device: str = "cpu") -> int:
    """Peak memory during one call of ``fn`` above what was resident just before it.

    CUDA: the caching allocator's peak statistic. CPU (Linux, glibc): the OS's resident
    high-water mark, reset just before the call (``/proc/self/clear_refs``). That is the
    step's true peak only in a process started with :data:`MALLOC_ENV` (large blocks
    mapped and unmapped one by one, never kept in the heap for reuse), which costs a page
    fault per allocation: measure memory in such a separate process, time in another.
    """
    import torch

    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        raise RuntimeError(f"peak_step_bytes on CPU needs a process started with {MALLOC_ENV}")
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    before = _proc_status_bytes("VmRSS")
    fn()
    return max(0, _proc_status_bytes("VmHWM") - before)


def _proc_status_bytes(key: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


# ----------------------------------------------------------------------------- probes


def wait_for_build(lightfn_cache: pathlib.Path, timeout: float = 900) -> None:
    """Wait until no process built with ``LIGHTFN_CACHE_DIR=lightfn_cache`` is left (a
    detached background build inherits it; one started as its process ended may not have
    taken the build lock yet) and nothing holds the AOT folder's build lock, so a build a
    timed process left running does not share the cores with the next one."""
    import fcntl

    marker = f"LIGHTFN_CACHE_DIR={lightfn_cache}".encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _processes_with(marker):
        time.sleep(0.1)
    folder = lightfn_cache / "aot"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.flock(f, fcntl.LOCK_UN)


def _processes_with(env_entry: bytes) -> bool:
    """Whether another live process has ``env_entry`` (``NAME=value``) in its environment."""
    for proc in pathlib.Path("/proc").glob("[0-9]*"):
        if proc.name == str(os.getpid()):
            continue
        try:
            if env_entry in (proc / "environ").read_bytes().split(b"\0"):
                return True
        except OSError:
            continue  # gone, or not ours
    return False


def run_probe(script: pathlib.Path, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    """Run ``script --probe ...`` in a fresh interpreter; return the JSON on its last stdout line."""
    proc = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=os.getcwd(),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        raise RuntimeError(f"probe {' '.join(argv)} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------- output


def _version(module: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": {m: _version(m) for m in ("torch", "lightning", "jax", "jaxlib", "optax", "lightfn")},
        "command": " ".join([pathlib.Path(sys.executable).name, *sys.argv]),
    }


def write_json(name: str, payload: dict[str, Any], out: pathlib.Path | None) -> pathlib.Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, pathlib.Path):
        return str(x)
    raise TypeError(f"not JSON-serializable: {type(x).__name__}")


def format_table(rows: list[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width (markdown-compatible) table; ``columns`` are (key, header, format)."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append(["-" if r.get(k) is None else (fmt.format(r[k]) if fmt else str(r[k])) for k, _, fmt in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
