"""Pieces the command lines share: logging, error reporting, data and recipe flags."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable

import torch

from .data import DaliUnavailableError, available_datasets, canonical_name
from .data.factory import LOADER_KINDS
from .data.plan import check_batch_split
from .data.spec import DataSpec
from .distributed import RankLostError, init_from_env, launcher_rank, raised_by_main, world_from_env
from .io import CheckpointError
from .locks import RUN_LOCK, FolderBusyError, folder_lock
from .recipe import TrainConfig
from .steps import DEPRECATED_STEP_KINDS, PRECISIONS, STEP_KINDS
from .trainer import NonFiniteLossError

__all__ = ["CliParser", "step_flag", "Terminated", "interrupted_exit", "raise_terminated", "add_data_args", "add_recipe_args", "apply_cpu_threads", "check_out_dir", "out_dir_lock", "dataset_flag", "error_line", "positive_int", "subset_size",
           "run_cli", "setup_logging", "start_distributed", "stop_distributed", "remove_if_empty",
           "is_launcher_main", "check_world_batch"]


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage error is one line naming the flag, not the whole usage.

    The commands have dozens of flags: argparse's usage block would push the one line that matters
    (``error: argument --epochs: invalid int value: 'x'``) below a screen of options.  Exit status 2.
    Flags are not abbreviated: ``--epoch`` is an error, not ``--epochs``.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)  # --epoch is a typo, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        # Under torchrun every process parses the same flags: rank 0 alone says what is wrong.
        self.exit(2, f"{self.prog}: error: {message} (all options: {self.prog} --help)\n" if launcher_rank() == 0
                  else None)


def step_flag(name: str) -> str:
    """``--step``'s value; an old spelling is translated, with one warning line (not a Python warning too)."""
    if name in DEPRECATED_STEP_KINDS:
        new = DEPRECATED_STEP_KINDS[name]
        print(f"warning: --step {name} is deprecated (the old name goes in the next release): use --step {new}",
              file=sys.stderr)
        return new
    return name


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr)


def dataset_flag(name: str) -> str:
    """The canonical name of ``--dataset``'s value; ``ValueError`` naming the flag and the known datasets."""
    try:
        return canonical_name(name)
    except ValueError:
        known = available_datasets()
        raise ValueError(f"--dataset: unknown dataset {name!r}; the known datasets are {', '.join(known[:-1])} "
                         f"and {known[-1]}") from None


class _DatasetAction(argparse.Action):
    """Checks ``--dataset`` while the flags are parsed, before a command creates or reads anything.

    An unknown name raises :func:`dataset_flag`'s ``ValueError`` out of ``parse_args`` (not argparse's usage
    dump), so :func:`run_cli` prints it as one ``error:`` line. The value is stored as given.
    """

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        dataset_flag(values)  # type: ignore[arg-type]
        setattr(namespace, self.dest, values)


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, action=_DatasetAction,
                   help="cifar10, cifar100, fashion-mnist, tiny-imagenet or synthetic")
    g.add_argument("--data-root", default=None, help="dataset folder (default $KTG_DATA_ROOT or ./data)")
    g.add_argument("--download", action="store_true", help="download CIFAR or Fashion-MNIST into --data-root when missing (needs internet)")
    g.add_argument("--val-size", type=int, default=0,
                   help="hold out this many training images as a validation split (default 0: train on all)")
    g.add_argument("--train-subset", type=subset_size, default=None, metavar="N",
                   help="use only the first N training images (N >= 1)")
    g.add_argument("--eval-subset", type=subset_size, default=None, metavar="N",
                   help="evaluate on only the first N images of each evaluated split (N >= 1)")
    g.add_argument("--loader", default="auto", choices=LOADER_KINDS,
                   help="input pipeline (auto: tensor on GPU for in-memory data, DALI for image folders)")


def add_recipe_args(p: argparse.ArgumentParser, *, epochs: int | None = None, data_order: bool = True) -> None:
    """The recipe's flags; every default is read from :class:`~ktg_fast.recipe.TrainConfig` (its one home).
    ``data_order`` False leaves out ``--data-seed`` and ``--data-offset`` (one run's batches; ``reproduce``,
    whose runs each draw theirs from their own seed, does not take them)."""
    d = TrainConfig()
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--epochs", type=int, default=d.epochs if epochs is None else epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="the global batch: under torchrun each of the N processes trains on its 1/N slice of it")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--milestones", type=int, nargs="*", default=d.milestones,
                   help="epochs of the x0.1 learning-rate steps (default: the recipe's, scaled to --epochs)")
    g.add_argument("--gamma", type=float, default=d.gamma)
    g.add_argument("--no-augment", action="store_true")
    if data_order:
        g.add_argument("--data-seed", type=int, default=d.data_seed, metavar="S",
                       help="seed of the batch order and augmentation (default: the run's seed); with --data-offset, "
                            "a packed search trial's batches (its trial.json's data_seed, data_offset) to retrain it "
                            "alone")
        g.add_argument("--data-offset", type=non_negative_int, default=d.data_offset, metavar="P",
                       help="epoch e trains on the batches of epoch e + P of --data-seed (default 0)")
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="forward arithmetic (default: fp32 on the CPU, bf16 on a CUDA device that has it); the "
                        "graph loss, weights and checkpoints stay fp32")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format (measure: it "
                                                                 "helps on some devices, hurts on others)")
    g.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="Inductor's on-disk cache for --step compiled (default <out>/inductor-cache): a second "
                        "run compiles in seconds")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--cpu-threads", type=positive_int, default=None, metavar="N",
                   help="torch threads on the CPU (default: torch's, one per core); a packed search trial retrained "
                        "alone matches its weights bit for bit with the search's --cpu-threads")
    g.add_argument("--step", default="auto", type=step_flag, choices=(*STEP_KINDS, *DEPRECATED_STEP_KINDS),
                   help="training-step path (auto: the fastest available here)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm of trainable nodes normalises with the global batch's statistics "
                        "(the update then equals one process's; default: each process's own slice, as DDP)")


def apply_cpu_threads(args: argparse.Namespace) -> None:
    """``--cpu-threads``: torch's intra-op threads for this process (None keeps torch's default)."""
    if getattr(args, "cpu_threads", None):
        torch.set_num_threads(args.cpu_threads)


def check_world_batch(args: argparse.Namespace) -> None:
    """Refuse, before anything is created or loaded, a ``--batch-size`` torchrun's processes cannot split.

    Raises:
        ValueError: fewer images in the global batch than processes (see
            :func:`ktg_fast.data.plan.check_batch_split`), or a malformed ``WORLD_SIZE``.
    """
    check_batch_split(args.batch_size, world_from_env())


def start_distributed(args: argparse.Namespace):
    """Join torchrun's process group when started by it (None for one process); quiet logs on ranks > 0."""
    ctx = init_from_env(args.device, sync_bn=args.sync_bn)
    if ctx is not None and not ctx.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    return ctx


def stop_distributed(ctx, *, finished: bool = True) -> None:
    """Leave the process group; after a run that ``finished``, together (a rank leaving alone may abort
    gloo's peers)."""
    if ctx is not None and torch.distributed.is_initialized():
        if finished:
            ctx.barrier()
        torch.distributed.destroy_process_group()


def recipe_from_args(args: argparse.Namespace, seed: int = 0):
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                       nesterov=not args.no_nesterov, weight_decay=args.weight_decay,
                       milestones=args.milestones, gamma=args.gamma, seed=seed, augment=not args.no_augment,
                       precision=args.precision, channels_last=args.channels_last,
                       data_seed=args.data_seed, data_offset=args.data_offset)


def data_from_args(args: argparse.Namespace, *, test: bool = True):
    return DataSpec(dataset=args.dataset, root=args.data_root, val_size=args.val_size, test=test,
                    train_subset=args.train_subset, eval_subset=args.eval_subset, loader=args.loader,
                    download=args.download)


# What a training run's folder may hold (one seed; several seeds add seed<N>/ folders).
RUN_FILES = frozenset({"checkpoint.pt", "metrics.jsonl", "graph.yaml", "final.json", "nodes", "inductor-cache",
                       "results.md",
                       "results.json"})
# What marks a search's folder.
SEARCH_FILES = ("study.db", "search.json", "trials")


def _describe_entries(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def remove_if_empty(out: Path) -> None:
    """Remove ``out`` if it holds nothing (a run refused after :func:`check_out_dir` made the folder)."""
    try:
        out.rmdir()  # fails on a folder with anything in it, which is what we want
    except OSError:
        pass


def is_launcher_main() -> bool:
    """Whether this process is global rank 0 of torchrun's processes (True outside torchrun)."""
    return launcher_rank() == 0


def out_dir_lock(out: Path) -> AbstractContextManager:
    """The lock a training run holds on its ``--out`` while it writes there (:func:`ktg_fast.locks.folder_lock`).

    Under torchrun only global rank 0 takes it: the other ranks write nothing, and share the folder with it.
    Raises :class:`ktg_fast.locks.FolderBusyError` on entry when another run holds it.
    """
    return folder_lock(out) if is_launcher_main() else nullcontext()


def check_out_dir(out: str | Path, *, seeds: int = 1, create: bool = True) -> Path:
    """Make ``--out`` ready for a training run, before any data is loaded; return it.

    Refuses a path that is a file, a folder holding a search or files a training run does not
    write (naming them), a single-seed run's folder reused for several seeds or the reverse, and
    a folder that cannot be created or written. A folder holding the same kind of run is
    accepted (``--resume`` decides what happens to it).  ``create`` False only checks what is
    there (torchrun's ranks > 0: rank 0 alone creates, and removes after a refusal, the folder).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose a folder path for the run")
    if out.is_dir():
        names = sorted(p.name for p in out.iterdir()  # temporary files and a killed run's lock file are not the run's
                       if not (p.name.startswith(".") and p.name.endswith(".tmp")) and p.name != RUN_LOCK)
        search = [n for n in names if n in SEARCH_FILES or n.startswith("study.db")]
        if search:
            raise ValueError(f"--out {out} holds a graph search ({_describe_entries(search)}): a training run "
                             "would mix its files with the search's; choose another --out folder")
        seed_dirs = [n for n in names if n.startswith("seed") and n[4:].isdigit() and (out / n).is_dir()]
        foreign = [n for n in names if n not in RUN_FILES and n not in seed_dirs]
        if foreign:
            raise ValueError(f"--out {out} holds files a training run does not write "
                             f"({_describe_entries(foreign)}): choose an empty or new --out folder")
        if seeds > 1 and (out / "checkpoint.pt").exists():
            raise ValueError(f"--out {out} holds a single-seed run (checkpoint.pt) but {seeds} seeds were given: "
                             "choose another --out folder for a multi-seed run")
        if seeds == 1 and seed_dirs:
            raise ValueError(f"--out {out} holds a multi-seed run ({_describe_entries(seed_dirs)}): pass the same "
                             "--seeds to resume it, or choose another --out folder")
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OSError(e.errno, f"--out {out} cannot be written ({(e.strerror or str(e)).lower()}): "
                               "choose a folder you can write to") from None
    return out


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def positive_int(text: str) -> int:
    """argparse type of a count that must be at least 1 (``--cpu-threads``, ``export --top``)."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def subset_size(text: str) -> int:
    """argparse type of ``--train-subset`` / ``--eval-subset``: at least 1 image."""
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e} (leave the flag out to use every image)") from None


def non_negative_int(text: str) -> int:
    """argparse type of an integer >= 0 (``--data-offset``)."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


RANK_EXIT_GRACE_S = 2.0  # how long a rank > 0 waits before exiting on a user error (see run_cli)


def _expected(e: BaseException) -> bool:
    """Failures a user can fix (bad input, files, storage, diverging training): one line, exit 2."""
    if isinstance(e, (OSError, ValueError, KeyError, CheckpointError, NonFiniteLossError, DaliUnavailableError,
                      RankLostError, FolderBusyError)):
        return True
    # Storage errors (sqlalchemy's, optuna's) without importing those packages here.
    return any(c.__module__.split(".")[0] in ("sqlalchemy", "optuna") for c in type(e).__mro__[:-2])


def error_line(e: BaseException) -> str:
    """The one-line message of an expected failure."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    if isinstance(e, OSError) and e.strerror:
        if e.filename is None:  # our own messages: OSError(errno, message)
            return e.strerror
        both = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{both}: {e.strerror[0].lower()}{e.strerror[1:]}"
    text = str(e) or type(e).__name__
    if type(e).__module__.split(".")[0] in ("sqlalchemy", "optuna"):
        text = f"storage error ({type(e).__name__}): {text.splitlines()[0]}"
    return text


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``kill``): stops the command as Ctrl-C does (work is given back, checkpoints
    stay), but exits 143 rather than 130."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler: raise :class:`Terminated` where the main thread is."""
    raise Terminated(f"signal {signum}")


def interrupted_exit(e: KeyboardInterrupt, hint: str) -> int:
    """Say why the command stopped and how to continue; return its exit status (143 SIGTERM, 130 Ctrl-C)."""
    print(f"{'stopped by SIGTERM' if isinstance(e, Terminated) else 'interrupted'}; {hint}", file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def run_cli(main: Callable[[], int], *, resume_hint: str = "rerun with --resume to continue") -> None:
    """Run a command line under one top-level handler.

    Expected failures (bad input, ``OSError`` such as a full disk or an unwritable folder, storage
    errors, unreadable checkpoints, a diverging run) print one ``error:`` line and exit 2, with the
    traceback too under ``-v``/``--verbose`` (or ``KTG_DEBUG=1``); anything else is a bug and keeps
    its traceback. Ctrl-C exits 130 with ``resume_hint`` (how this command continues); SIGTERM stops it
    the same way and exits 143. A closed stdout pipe (``| head``) exits 141 without a message.
    """
    verbose = bool(os.environ.get("KTG_DEBUG")) or any(a in ("-v", "--verbose") for a in sys.argv[1:])
    # Under torchrun, ranks > 0 leave the messages every rank would print alike to rank 0.
    rank = launcher_rank()
    distributed = os.environ.get("WORLD_SIZE", "1") != "1"
    if (not distributed and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        # As Ctrl-C: checkpoints kept, trials given back.  Not under torchrun: its agent stops the ranks with
        # SIGTERM, and a rank blocked in a collective would run the handler only when the collective returns.
        signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is then handled below
    except BrokenPipeError:
        # The reader went away (``... | head``): stop quietly, as other command-line tools do, with the
        # status of a process ended by SIGPIPE; stdout goes to /dev/null so that the exit's flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(128 + signal.SIGPIPE)
    except KeyboardInterrupt as e:
        if rank == 0:
            sys.exit(interrupted_exit(e, resume_hint))
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except Exception as e:
        if not _expected(e):
            raise
        if verbose:
            traceback.print_exc()
        # A rank's own trouble (a lost peer, the system's error on its disk) it says itself; input errors every
        # rank meets alike (our own OSErrors carry no errno: a missing dataset or teacher) rank 0 says once.
        own = (isinstance(e, RankLostError) or (isinstance(e, OSError) and e.errno is not None)) \
            and not raised_by_main(e)
        if rank == 0 or own:
            print(f"error: {error_line(e)}", file=sys.stderr)
        if rank != 0:
            # torchrun stops every rank once one exits: leave rank 0, which meets the same bad input, the
            # moment it needs to say what it is and to clean up after itself.
            time.sleep(RANK_EXIT_GRACE_S)
        sys.exit(2)
    sys.exit(code)
