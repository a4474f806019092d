"""``devit-mq prune BUNDLE --part K --macs 0.5 --out NEW_BUNDLE [--candidates 100] [--recover-epochs E]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..logs import add_log_arguments, setup_logging

DESCRIPTION = ("Structurally prune sub-models of a bundle (attention heads and MLP neurons, DeViT's HSIC + L1 "
               "importance) to a MACs budget, choosing the per-layer sparsity on the validation split, recover by "
               "distillation from the unpruned sub-model, and write a new bundle.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq prune", description=DESCRIPTION)
    parser.add_argument("bundle", help="the bundle to prune (never modified)")
    parser.add_argument("--part", type=int, action="append", required=True,
                        help="sub-model index to prune (repeat for several; pruned in the order given)")
    parser.add_argument("--macs", type=float, default=0.5, help="target MACs as a fraction of the sub-model's (0.5)")
    parser.add_argument("--out", required=True, help="directory of the new bundle")
    parser.add_argument("--candidates", type=int, default=100, help="per-layer sparsity candidates to score (100)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="candidates' MACs within +-this of the target")
    parser.add_argument("--importance-batches", type=int, default=8, help="batches the importance is averaged over")
    parser.add_argument("--recover-epochs", type=int, default=20, help="distillation epochs after pruning (0: none)")
    parser.add_argument("--recover-lr", type=float, default=5e-4)
    parser.add_argument("--val-size", type=int, default=500,
                        help="validation images carved from the training data if the bundle records no split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few candidates and images, one epoch")
    add_log_arguments(parser, default_level="info")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args)

    import torch

    from ..data import DataError
    from ..model import BundleError, ConfigError
    from .run import PruneSettings, run

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = PruneSettings(parts=tuple(args.part), macs=args.macs, tolerance=args.tolerance,
                             candidates=args.candidates, importance_batches=args.importance_batches,
                             recover_epochs=args.recover_epochs, recover_lr=args.recover_lr,
                             val_size=args.val_size, seed=args.seed, quick=args.quick)
    try:
        run(args.bundle, args.out, settings)
    except (ConfigError, DataError, BundleError, ValueError) as exc:
        print(f"devit-mq prune: error: {exc}", file=sys.stderr)
        return 2
    print(f"bundle written to {args.out}")
    return 0
