"""Pieces the command lines share: logging, error reporting, data and recipe flags."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

__all__ = ["add_data_args", "add_recipe_args", "run_cli", "setup_logging"]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="cifar10, cifar100, fashion-mnist, tiny-imagenet or synthetic")
    g.add_argument("--data-root", default=None, help="dataset folder (default $KTG_DATA_ROOT or ./data)")
    g.add_argument("--download", action="store_true", help="download CIFAR when missing (needs internet)")
    g.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images as a validation split (default 0: train on all)")
    g.add_argument("--train-subset", type=int, default=None, help="use only the first N training images")
    g.add_argument("--eval-subset", type=int, default=None, help="evaluate on only the first N images")
    g.add_argument("--loader", default="auto", choices=["auto", "tensor", "dali", "torch"],
                   help="input pipeline (auto: tensor on GPU for in-memory data, DALI for image folders)")


def add_recipe_args(p: argparse.ArgumentParser, *, epochs: int = 200) -> None:
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--no-nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--milestones", type=int, nargs="*", default=None,
                   help="epochs of the x0.1 learning-rate steps (default: the recipe's, scaled to --epochs)")
    g.add_argument("--gamma", type=float, default=0.1)
    g.add_argument("--no-augment", action="store_true")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--step", default="auto", choices=["auto", "eager", "fused", "graph"],
                   help="training-step path (auto: the fastest available)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_from_args(args: argparse.Namespace, seed: int = 0):
    from .recipe import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       nesterov=not args.no_nesterov, weight_decay=args.weight_decay,
                       milestones=args.milestones, gamma=args.gamma, seed=seed, augment=not args.no_augment)


def data_from_args(args: argparse.Namespace, *, test: bool = True):
    from .trainer import DataSpec

    return DataSpec(dataset=args.dataset, root=args.data_root, val_size=args.val_size, test=test,
                    train_subset=args.train_subset, eval_subset=args.eval_subset, loader=args.loader,
                    download=args.download)


def run_cli(main: Callable[[], int]) -> None:
    """Run a command line: expected errors print one clear line and exit 2 (``KTG_DEBUG=1`` shows tracebacks)."""
    from .data import DatasetNotFoundError
    from .graph import GraphError
    from .nodes import TeacherNotFoundError
    from .trainer import NonFiniteLossError, RunExistsError

    import os

    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        sys.exit(130)
    except (GraphError, DatasetNotFoundError, TeacherNotFoundError, NonFiniteLossError, RunExistsError,
            ValueError, KeyError) as e:
        if os.environ.get("KTG_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
