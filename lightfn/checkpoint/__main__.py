"""``python -m lightfn.checkpoint consolidate FOLDER OUT``: one ordinary checkpoint file
from a sharded checkpoint folder (``lf.fit(strategy="fsdp")``, ``save_sharded``).

A command because the machine that reads the weights (an inference box, a notebook) often
has neither the ranks nor lightfn's distributed setup; it runs in one plain process.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, or 1 after printing what went wrong)."""
    parser = argparse.ArgumentParser(prog="python -m lightfn.checkpoint", description="lightfn checkpoint tools")
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser(
        "consolidate",
        help="write a sharded checkpoint folder as one checkpoint file",
        description="Reassemble every rank's slices of a sharded checkpoint folder (index.json plus one file per "
        "rank) into one ordinary lightfn checkpoint file, keeping its metadata (hparams, fit's bookkeeping).",
    )
    cmd.add_argument("folder", help="the sharded checkpoint folder (holding index.json)")
    cmd.add_argument("out", help="the checkpoint file to write, e.g. model.safetensors")
    args = parser.parse_args(argv)
    # Imported after parsing so --help is instant; lightfn.distributed imports this package.
    from ..distributed.sharded_folder import consolidate

    try:
        out = consolidate(args.folder, args.out)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
