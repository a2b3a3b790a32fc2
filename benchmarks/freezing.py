"""Fine-tuning a head on a frozen backbone: ``lf.train_step(..., trainable=...)`` against torch and an optimizer mask.

    python benchmarks/freezing.py            # table + results/freezing.json
    python benchmarks/freezing.py --quick    # smoke test

torchvision's resnet18 (``weights=None``: random init, no download) with a 10-class head,
batch 8x3x64x64, Adam(1e-3) on the head (``fc``) only; the backbone is frozen and runs in
eval mode (BatchNorm reads its running statistics), as when fine-tuning. Every variant runs
over the same few pre-built batches, resident on the device; only the step is timed.

- ``lightfn_trainable_jit``: ``lf.jit(lf.train_step(loss_fn, adam, trainable=<fc only>),
  donate=True)``: gradients for the head only; the backbone is a constant of the loss;
- ``lightfn_masked_jit``: today's other way, an optimizer mask: ``multi_transform`` with
  ``set_to_zero()`` for the backbone, same compiled step but without ``trainable=``, so
  gradients of all 11.2M params are computed and then zeroed;
- ``torch_eager``: plain torch, ``requires_grad_(False)`` on the backbone, ``zero_grad /
  backward / torch.optim.Adam.step`` (default foreach) in eager mode (not compiled).

Target: lightfn_trainable_jit within 1.3x of torch_eager (us/step, lower is better).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common as C  # noqa: E402

LR, BATCH, SIDE, CLASSES, N_BATCHES = 1e-3, 8, 64, 10, 4
TARGET = 1.3


def _model():
    import torch
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=CLASSES)


def _is_head(path: tuple[Any, ...], leaf: Any) -> bool:
    return path[0].startswith("fc.")


def lightfn_variant(batches, device: str, *, trainable: bool):
    import torch.nn.functional as F

    import lightfn as lf

    model = _model().to(device)
    # The backbone's BatchNorm stays in eval mode while the step trains (the head has none).
    backbone = [name for name, _ in model.named_children() if name != "fc"]
    apply, params = lf.functionalize(model, eval_modules=backbone)

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(apply(params, x), y)

    adam = lf.optim.adam(LR)
    if trainable:
        opt, step = adam, lf.train_step(loss_fn, adam, trainable=_is_head)
        state = lf.TrainState.create(params=params, optimizer=opt, trainable=_is_head)
    else:
        labels = lambda p: {k: "train" if k.startswith("fc.") else "frozen" for k in p}  # noqa: E731
        opt = lf.optim.multi_transform({"train": adam, "frozen": lf.optim.set_to_zero()}, labels)
        step = lf.train_step(loss_fn, opt)
        state = lf.TrainState.create(params=params, optimizer=opt)
    holder = {"state": state}
    step = lf.jit(step, donate=True)
    it = iter(range(1 << 62))

    def run() -> None:
        holder["state"], _ = step(holder["state"], batches[next(it) % len(batches)])

    return run


def torch_variant(batches, device: str):
    import torch.nn.functional as F
    import torch

    model = _model().to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    model.train()
    for name, child in model.named_children():
        if name != "fc":
            child.eval()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=LR)
    it = iter(range(1 << 62))

    def run() -> None:
        x, y = batches[next(it) % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return run


VARIANTS = {
    "lightfn_trainable_jit": lambda b, d: lightfn_variant(b, d, trainable=True),
    "lightfn_masked_jit": lambda b, d: lightfn_variant(b, d, trainable=False),
    "torch_eager": torch_variant,
}


def main(argv: list[str] | None = None) -> int:
    import torch

    p = C.base_parser(__doc__.splitlines()[0])
    p.set_defaults(warmup=10, steps=20, repeats=7)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    args = C.apply_quick(p.parse_args(argv))
    args.device = C.resolve_device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(BATCH, 3, SIDE, SIDE, generator=g).to(args.device),
                torch.randint(0, CLASSES, (BATCH,), generator=g).to(args.device)) for _ in range(N_BATCHES)]
    info = C.machine_info()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    rows: list[dict[str, Any]] = []
    for name in args.variants.split(","):
        clock = C.StepClock(warmup=args.warmup, window=args.steps, repeats=args.repeats, sync=sync)
        C.time_loop(VARIANTS[name](batches, args.device), clock)
        us = clock.median_us()
        rows.append({"variant": name, "us_per_step": us, "cpu_us_per_step": clock.median_cpu_us(),
                     "samples_per_s": BATCH / us * 1e6, "windows_us": [w * 1e6 for w in clock.per_step_s()]})
        print(f"{name}: {us:.0f} us/step", flush=True)
    by = {r["variant"]: r for r in rows}
    torch_us = by["torch_eager"]["us_per_step"] if "torch_eager" in by else None
    for r in rows:
        r["x_torch_eager"] = None if torch_us is None else r["us_per_step"] / torch_us
    table = C.format_table(rows, [("variant", "variant", ""), ("us_per_step", "us/step", "{:.0f}"),
                                  ("cpu_us_per_step", "CPU us/step", "{:.0f}"), ("samples_per_s", "samples/s", "{:.0f}"),
                                  ("x_torch_eager", "x torch_eager", "{:.2f}x")])
    ratio = by["lightfn_trainable_jit"]["x_torch_eager"] if "lightfn_trainable_jit" in by else None
    mask_gain = (by["lightfn_masked_jit"]["us_per_step"] / by["lightfn_trainable_jit"]["us_per_step"]
                 if {"lightfn_masked_jit", "lightfn_trainable_jit"} <= set(by) else None)
    print(f"\nresnet18 frozen backbone, head-only Adam, batch {BATCH}x3x{SIDE}x{SIDE}, {args.device}")
    print(table)
    if ratio is not None:
        print(f"trainable= vs torch eager requires_grad_(False): {ratio:.2f}x the time "
              f"(target <= {TARGET}x: {'met' if ratio <= TARGET else 'MISSED'})")
    if mask_gain is not None:
        print(f"optimizer mask (all grads computed) vs trainable=: {mask_gain:.2f}x the time")
    payload = {"benchmark": "freezing", "machine": info, "device": args.device, "batch_shape": [BATCH, 3, SIDE, SIDE],
               "model": "torchvision resnet18 (weights=None), fc -> 10 classes; backbone frozen, in eval mode",
               "settings": {"warmup": args.warmup, "steps": args.steps, "repeats": args.repeats},
               "variants": rows, "trainable_vs_torch_eager": ratio, "masked_vs_trainable": mask_gain,
               "target": TARGET, "table": table}
    print(f"wrote {C.write_json('freezing', payload, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
