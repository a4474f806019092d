"""``devit-mq train CONFIG.yaml [--out DIR] [--resume] [--quick]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..logs import add_log_arguments, setup_logging


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="devit-mq train", description="Run the DEKD pipeline and write a bundle.")
    parser.add_argument("config", help="training config (YAML), e.g. configs/default.yaml")
    parser.add_argument("--out", help="bundle directory (default: the config's output.bundle)")
    parser.add_argument("--work-dir", help="stage checkpoints (default: output.work_dir or '<out>.work')")
    parser.add_argument("--resume", action="store_true", help="reuse finished stages whose settings are unchanged")
    parser.add_argument("--quick", action="store_true", help="smoke run: one epoch per stage on a small subset")
    parser.add_argument("--stop-after", choices=("teacher", "students", "fusion"), help="stop after this stage")
    parser.add_argument("--threads", type=int, help="torch threads (default: the config's; 1 suits a busy machine)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the run without the relation loss")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train (default: the config's)")
    parser.add_argument("--no-amp", action="store_true", help="full precision on CUDA too (no mixed precision)")
    add_log_arguments(parser, default_level="info")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    setup_logging(args)

    from ..data import DataError
    from ..model import BundleError, ConfigError
    from ..profile import ProfileError
    from .config import load_config
    from .pipeline import quick_config, run

    try:
        cfg = load_config(args.config)
        if args.quick:
            cfg = quick_config(cfg)
        if args.threads:
            cfg = cfg.replace(threads=args.threads)
        if args.device:
            cfg = cfg.replace(device=args.device)
        if args.no_amp:
            cfg = cfg.replace(amp=False)
        run(cfg, out=args.out, work_dir=args.work_dir, resume=args.resume, stop_after=args.stop_after,
            ablation=False if args.no_ablation else None)
    except (ConfigError, DataError, BundleError, ProfileError) as exc:
        print(f"devit-mq train: error: {exc}", file=sys.stderr)
        return 2
    return 0
