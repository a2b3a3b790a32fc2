"""What the examples share besides data: their command-line flags and set-up.

``example_parser`` gives every example the same flags (data folder, output folder, epochs,
limits, batch size, learning rate, ``--no-jit``, seed, threads); ``setup`` applies the seed
and the thread count. The examples print one line per epoch with
``lf.callbacks.ProgressLog``, on a terminal or not.
"""

from __future__ import annotations

import argparse
import logging
import pathlib

import torch

import lightfn as lf

__all__ = ["example_parser", "setup", "jit_arg", "describe_jit"]


def _int_or_fraction(text: str) -> int | float:
    return float(text) if "." in text or "e" in text else int(text)


def example_parser(
    description: str, name: str, *, max_epochs: int, batch_size: int, lr: float, threads: int | None = 1
) -> argparse.ArgumentParser:
    """The flags every example shares (its own go on top)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", type=pathlib.Path, default=pathlib.Path("data"), help="folder with MNIST IDX files (default: data)")
    parser.add_argument("--no-download", action="store_true", help="do not try to download MNIST when it is not in --data-dir")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs") / name, help=f"output folder (default: runs/{name})")
    parser.add_argument("--max-epochs", type=int, default=max_epochs, help=f"default {max_epochs}")
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--limit-train-batches", type=_int_or_fraction, default=None, help="batches per epoch (int or fraction)")
    parser.add_argument("--limit-val-batches", type=_int_or_fraction, default=None, help="batches per validation (int or fraction)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"default {batch_size}")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--no-jit", action="store_true", help="run eagerly instead of compiling the steps")
    parser.add_argument(
        "--jit-mode", choices=("auto", "sync", "background"), default="auto",
        help="when the steps compile: background (train eagerly at once, switch when the compiled graphs are built; "
        "a later run loads them), sync (before the first step), auto (fit's default: background on one CPU process)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=threads,
        help=f"CPU threads for tensor ops (default {threads or 'torch chooses'}; 0: torch chooses). Small models "
        "gain little from more, and spinning threads stall badly when other jobs share the cores",
    )
    return parser


def jit_arg(args: argparse.Namespace) -> bool | str:
    """fit's ``jit`` argument from ``--no-jit`` / ``--jit-mode``."""
    if args.no_jit:
        return False
    return True if args.jit_mode == "auto" else args.jit_mode


def describe_jit(args: argparse.Namespace) -> str:
    """How the run compiles, for the example's first line."""
    if args.no_jit:
        return "eagerly"
    if args.jit_mode == "sync":
        return "compiled with lf.jit before the first step"
    return "compiled with lf.jit in the background (eager steps until the graphs are built or loaded)"


def setup(args: argparse.Namespace) -> None:
    """Seed torch's global generator (modules' initial weights) and set the CPU thread count."""
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    # inductor's C++ toolchain lookup warns "No CUDA runtime is found" on every CPU-only
    # machine; it says nothing about this run
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
