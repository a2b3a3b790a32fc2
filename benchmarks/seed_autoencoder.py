"""The seed autoencoder (784-64-3-64-784, Adam 1e-3, batch 64) in lightfn, PyTorch, Lightning and JAX.

    python benchmarks/seed_autoencoder.py                    # full run, table + results/seed_autoencoder.json
    python benchmarks/seed_autoencoder.py --quick --probes none   # smoke test

Every system trains the same model on the same data in this one process, back to back:

- ``lightfn``: ``fit(lf.train_step(loss_fn, adam), state, ArrayLoader)`` with fit's defaults
  and a CSV logger (logging on, as a user runs it);
- ``torch``: the seed's loop, ``torch.optim.Adam`` over a ``DataLoader``;
- ``lightning``: the seed's ``LitAutoEncoder`` with ``Trainer.fit`` (skipped if not installed);
- ``jax_jit``: the step under ``jax.jit``, one dispatch per step, the batch gathered inside
  the graph from a device-resident dataset; ``jax_scan``: a whole epoch as one
  ``jax.lax.scan`` (skipped if JAX/optax are not installed).

Steady state is timed per _common's rule (warm-up excluded, median of windows). The first
step's latency and peak RSS come from fresh processes (``--probe``): "cold" with an empty
compile cache (a new ``TORCHINDUCTOR_CACHE_DIR`` / JAX compilation cache), "warm" with the
cache the cold run filled. Latency counts from the call that starts training (``fit``,
``Trainer.fit``, the first loop iteration) to the end of the first step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DIMS = (784, 64, 3, 64, 784)
LR, BATCH = 1e-3, 64
SYSTEMS = ("lightfn", "torch", "lightning", "jax_jit", "jax_scan")


def available(system: str) -> str | None:
    """None if the system can run here, else why not."""
    import importlib.util

    need = {"lightning": ("lightning",), "jax_jit": ("jax", "optax"), "jax_scan": ("jax", "optax")}.get(system, ())
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(missing)} (pip install 'lightfn[bench]')" if missing else None


# ----------------------------------------------------------------------------- torch-based systems


def _modules():
    import torch
    from torch import nn

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.ReLU(), nn.Linear(DIMS[1], DIMS[2]))
    decoder = nn.Sequential(nn.Linear(DIMS[2], DIMS[3]), nn.ReLU(), nn.Linear(DIMS[3], DIMS[4]))
    return encoder, decoder


def _sync(device: str):
    import torch

    return torch.cuda.synchronize if device.startswith("cuda") else None


def lightfn_problem() -> tuple[Any, Any]:
    """The seed model as lightfn trains it: ``(lf.train_step, TrainState)`` (also used by
    aot_cache.py, so both benchmarks time the same step)."""
    import torch.nn.functional as F

    import lightfn as lf

    encoder, decoder = _modules()
    encode, enc_params = lf.functionalize(encoder)
    decode, dec_params = lf.functionalize(decoder)

    def loss_fn(params, batch):
        (xb,) = batch
        return F.mse_loss(decode(params["decoder"], encode(params["encoder"], xb)), xb)

    opt = lf.optim.adam(LR)
    state = lf.TrainState.create(params={"encoder": enc_params, "decoder": dec_params}, optimizer=opt, seed=0)
    return lf.train_step(loss_fn, opt), state


def run_lightfn(x, clock: C.StepClock, device: str, on_first_step=None) -> dict[str, Any]:
    import torch

    import lightfn as lf
    from lightfn.fit import fit

    step, state = lightfn_problem()
    loader = lf.data.ArrayLoader((torch.from_numpy(x),), batch_size=BATCH, device=device)

    class Clock(lf.callbacks.Callback):
        def on_train_batch_end(self, ctx):
            if ctx.step == 1 and on_first_step is not None:
                on_first_step()
            clock.tick()
            return lf.callbacks.Signal(stop=True, reason="timed") if clock.done else None

    with tempfile.TemporaryDirectory() as logs:
        logger = lf.loggers.CSVLogger(logs)
        state = fit(step, state, loader, max_epochs=-1, max_steps=clock.total_steps,
                    callbacks=[Clock()], loggers=[logger], device=device, progress=False)
        logger.close()
    return {}


def run_torch(x, clock: C.StepClock, device: str, on_first_step=None) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    encoder, decoder = (m.to(device) for m in _modules())
    opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=LR)
    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=BATCH, shuffle=True, drop_last=True)
    first = True
    while not clock.done:
        for (xb,) in loader:
            xb = xb.to(device, non_blocking=True)
            loss = F.mse_loss(decoder(encoder(xb)), xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if first and on_first_step is not None:
                on_first_step()
                first = False
            if clock.tick():
                break
    return {"final_loss": float(loss.detach())}


def run_lightning(x, clock: C.StepClock, device: str, on_first_step=None) -> dict[str, Any]:
    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    class LitAutoEncoder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.encoder, self.decoder = _modules()

        def training_step(self, batch, batch_idx):
            (xb,) = batch
            loss = F.mse_loss(self.decoder(self.encoder(xb)), xb)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=LR)

    class Clock(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1 and on_first_step is not None:
                on_first_step()
            if clock.tick():
                trainer.should_stop = True

    loader = DataLoader(TensorDataset(torch.from_numpy(x)), batch_size=BATCH, shuffle=True, drop_last=True)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as logs, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(
            max_steps=clock.total_steps, max_epochs=-1, accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1, logger=L.pytorch.loggers.CSVLogger(logs), callbacks=[Clock()], enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=50, default_root_dir=logs,
        )
        model = LitAutoEncoder()
        with contextlib.redirect_stdout(io.StringIO()):
            trainer.fit(model, loader)
    loss = trainer.callback_metrics.get("train_loss")
    return {"final_loss": None if loss is None else float(loss)}


# ----------------------------------------------------------------------------- JAX


def jax_problem(seed: int = 0) -> tuple[Any, Any, Any]:
    """The seed model in JAX: ``(params, loss_fn, optax.adam(LR))``, initialized as
    ``nn.Linear`` initializes (also used by the startup benchmark's JAX row)."""
    import jax
    import jax.numpy as jnp
    import optax

    keys = jax.random.split(jax.random.PRNGKey(seed), len(DIMS) - 1)
    params = []
    for k, (i, o) in zip(keys, zip(DIMS, DIMS[1:])):
        kw, kb = jax.random.split(k)
        bound = 1.0 / i**0.5  # nn.Linear's default init range
        params.append((jax.random.uniform(kw, (i, o), jnp.float32, -bound, bound), jax.random.uniform(kb, (o,), jnp.float32, -bound, bound)))

    def loss_fn(p, xb):
        h = xb
        for n, (w, b) in enumerate(p):
            h = h @ w + b
            if n in (0, 2):
                h = jax.nn.relu(h)
        return jnp.mean((h - xb) ** 2)

    return params, loss_fn, optax.adam(LR)


def _jax_setup(x):
    import jax
    import jax.numpy as jnp
    import optax

    params, loss_fn, opt = jax_problem()

    def step(p, s, xb):
        loss, g = jax.value_and_grad(loss_fn)(p, xb)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    return jax, jnp, params, opt.init(params), step, jax.device_put(jnp.asarray(x))


def run_jax_jit(x, clock: C.StepClock, device: str, on_first_step=None) -> dict[str, Any]:
    jax, jnp, params, opt_state, step, data = _jax_setup(x)
    n_batches = len(x) // BATCH

    @jax.jit
    def one(p, s, data, perm, i):
        idx = jax.lax.dynamic_slice_in_dim(perm, i * BATCH, BATCH)
        return step(p, s, jnp.take(data, idx, axis=0))

    permute = jax.jit(lambda key: jax.random.permutation(key, data.shape[0]))
    clock.sync = lambda: jax.block_until_ready(params)
    key, epoch, first = jax.random.PRNGKey(1), 0, True
    while not clock.done:
        perm = permute(jax.random.fold_in(key, epoch))
        for i in range(n_batches):
            params, opt_state, loss = one(params, opt_state, data, perm, i)
            if first and on_first_step is not None:
                jax.block_until_ready(loss)
                on_first_step()
                first = False
            if clock.tick():
                break
        epoch += 1
    return {"final_loss": float(loss)}


def run_jax_scan(x, clock: C.StepClock, device: str, on_first_step=None) -> dict[str, Any]:
    jax, jnp, params, opt_state, step, data = _jax_setup(x)
    n_batches = len(x) // BATCH

    @jax.jit
    def epoch_fn(p, s, data, key):
        perm = jax.random.permutation(key, data.shape[0])[: n_batches * BATCH].reshape(n_batches, BATCH)

        def body(carry, idx):
            p, s = carry
            p, s, loss = step(p, s, jnp.take(data, idx, axis=0))
            return (p, s), loss

        (p, s), losses = jax.lax.scan(body, (p, s), perm)
        return p, s, losses[-1]

    clock.sync = lambda: jax.block_until_ready(params)
    # whole epochs per tick: the windows are epochs, whatever --steps says
    clock.window = n_batches
    clock.warmup = max(clock.warmup, n_batches)
    key, epoch = jax.random.PRNGKey(1), 0
    while not clock.done:
        params, opt_state, loss = epoch_fn(params, opt_state, data, jax.random.fold_in(key, epoch))
        if epoch == 0 and on_first_step is not None:
            jax.block_until_ready(loss)
            on_first_step()
        clock.tick(n_batches)
        epoch += 1
    return {"final_loss": float(loss)}


RUNNERS = {"lightfn": run_lightfn, "torch": run_torch, "lightning": run_lightning, "jax_jit": run_jax_jit, "jax_scan": run_jax_scan}


# ----------------------------------------------------------------------------- probes (fresh processes)


def probe(system: str, x, device: str, steps: int) -> dict[str, Any]:
    """In a fresh process: seconds from the start of training to the first step done, and peak RSS."""
    if system.startswith("jax") and os.environ.get("LIGHTFN_BENCH_JAX_CACHE"):
        import jax

        jax.config.update("jax_compilation_cache_dir", os.environ["LIGHTFN_BENCH_JAX_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    marks: dict[str, float] = {}
    clock = C.StepClock(warmup=steps, window=1, repeats=1)
    t0 = time.perf_counter()
    RUNNERS[system](x, clock, device, on_first_step=lambda: marks.setdefault("first", time.perf_counter()))
    return {"system": system, "first_step_s": marks["first"] - t0, "peak_rss_mb": C.peak_rss_mb()}


def probe_both(system: str, args) -> dict[str, Any]:
    """First-step latency and peak RSS, each from a fresh process.

    ``--probes all``: cold (a new, empty cache directory) then warm (the same directory,
    now filled). ``--probes warm``: one process using the environment's own compile cache
    (``TORCHINDUCTOR_CACHE_DIR``), which is warm once the step has compiled there before.
    """
    argv = ["--probe", system, "--data-dir", str(args.data_dir), "--device", args.device, "--probe-steps", str(args.probe_steps)]
    argv += ["--threads", str(args.threads)] if args.threads else []
    if args.probes == "warm":
        r = C.run_probe(pathlib.Path(__file__), argv)
        return {"first_step_warm_s": r["first_step_s"], "peak_rss_mb": r["peak_rss_mb"]}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lightfn-bench-cache-") as cache:
        env = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(cache, "inductor"), "LIGHTFN_BENCH_JAX_CACHE": os.path.join(cache, "jax")}
        for phase in ("cold", "warm"):
            r = C.run_probe(pathlib.Path(__file__), argv, env=env)
            out[f"first_step_{phase}_s"] = r["first_step_s"]
            out["peak_rss_mb"] = max(out.get("peak_rss_mb", 0.0), r["peak_rss_mb"])
    return out


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--probes", choices=("all", "warm", "none"), default="all",
                   help="first-step latency / peak RSS in fresh processes: cold and warm cache, warm only, or skip")
    p.add_argument("--probe-steps", type=int, default=200, help="steps each probe process runs (peak RSS covers them)")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one probe process
    args = C.apply_quick(p.parse_args(argv))
    args.device = C.resolve_device(args.device)
    if args.quick:
        args.probe_steps = min(args.probe_steps, 5)
    x, _, source = C.load_images(args.data_dir)

    if args.probe:
        import json

        print(json.dumps(probe(args.probe, x, args.device, args.probe_steps)))
        return 0

    info = C.machine_info()
    print(f"data: {source}; device {args.device}; {info['cpu']}, {info['cores']} cores; torch {info['versions']['torch']}")
    floor_rate = C.sgemm_flops_per_s()
    flops = C.mlp_train_flops(DIMS, BATCH)
    floor_us = flops / floor_rate * 1e6
    print(f"sgemm {floor_rate / 1e9:.1f} GFLOP/s; step = {flops / 1e6:.1f} MFLOP; FLOP floor {floor_us:.0f} us/step")

    rows, skipped = [], {}
    for system in args.systems.split(","):
        why = available(system)
        if why:
            skipped[system] = why
            print(f"{system}: skipped ({why})")
            continue
        clock = C.StepClock(warmup=args.warmup, window=args.steps, repeats=args.repeats, sync=_sync(args.device))
        extra = RUNNERS[system](x, clock, args.device)
        us = clock.median_us()
        row = {"system": system, "us_per_step": us, "samples_per_s": BATCH / us * 1e6, "cpu_us_per_step": clock.median_cpu_us(), "x_floor": us / floor_us,
               "windows_us": [w * 1e6 for w in clock.per_step_s()], **extra}
        if args.probes != "none":
            row.update(probe_both(system, args))
        rows.append(row)
        print(f"{system}: {us:.0f} us/step", flush=True)

    base = next((r for r in rows if r["system"] == "lightfn"), None)
    for r in rows:
        # speedup of lightfn over this system (>1: lightfn is faster)
        r["lightfn_speedup"] = None if base is None else r["us_per_step"] / base["us_per_step"]
    columns = [("system", "system", ""), ("us_per_step", "us/step", "{:.0f}"), ("cpu_us_per_step", "CPU us/step", "{:.0f}"), ("samples_per_s", "samples/s", "{:.0f}"),
               ("x_floor", "x FLOP floor", "{:.2f}"), ("lightfn_speedup", "lightfn speedup", "{:.2f}x"),
               ("first_step_cold_s", "first step cold (s)", "{:.2f}"), ("first_step_warm_s", "first step warm (s)", "{:.2f}"),
               ("peak_rss_mb", "peak RSS (MiB)", "{:.0f}"), ("final_loss", "final loss", "{:.4f}")]
    table = C.format_table(rows, columns)
    print(f"\nseed autoencoder, batch {BATCH}, {args.device}: FLOP floor {floor_us:.0f} us/step ({floor_rate / 1e9:.1f} GFLOP/s sgemm)")
    print(table)
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    payload = {"benchmark": "seed_autoencoder", "machine": info, "data": source, "device": args.device, "batch_size": BATCH,
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats, "probes": args.probes},
               "sgemm_flops_per_s": floor_rate, "step_flops": flops, "flop_floor_us": floor_us,
               "systems": rows, "skipped": skipped, "table": table}
    print(f"wrote {C.write_json('seed_autoencoder', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
