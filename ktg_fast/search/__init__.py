"""ASHA search over knowledge transfer graphs (Section 3.5 of the paper; SEMANTICS.md, "Search").

    python -m ktg_fast.search --nodes 3 --target resnet32 --dataset cifar100 --trials 1500 --out runs/s3
    python -m ktg_fast.search export --out runs/s3 --top 5

Modules, one job each: ``space`` (the graphs searched), ``config`` (settings,
search.json), ``storage`` (Optuna storages, locks), ``study`` (create/join a
study, sampler, pruner), ``ledger`` (which trials count and may start),
``teachers`` (frozen nodes' checkpoints on demand), ``worker`` (the trial
loop), ``progress`` (the live line), ``export`` (graphs, table, plots),
``budget`` (expected epochs per trial under ASHA), ``cli`` (the command line).
"""
from .budget import expected_epochs_per_trial, trials_per_hour
from .config import SearchConfig
from .export import export_study
from .ledger import Ledger
from .space import DEFAULT_GATES, DEFAULT_MODELS, SearchError, SearchSpace
from .worker import Worker

__all__ = [
    "DEFAULT_GATES",
    "DEFAULT_MODELS",
    "Ledger",
    "SearchConfig",
    "SearchError",
    "SearchSpace",
    "Worker",
    "expected_epochs_per_trial",
    "export_study",
    "trials_per_hour",
]
