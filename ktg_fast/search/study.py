"""Creating, joining and checking a search's Optuna study.

The study stores its settings (``ktg_spec``) and its trial budget
(``ktg_trials``) as study user attributes, so every worker, on any machine,
checks that it runs the same search and reads the current budget.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any, Optional

import optuna

from .config import SearchConfig, spec_differences
from .space import SearchError
from .storage import mask_url, open_storage

__all__ = ["SPEC_ATTR", "BUDGET_ATTR", "make_sampler", "make_pruner", "create_or_join", "load_search_study",
           "open_for_reading"]

log = logging.getLogger("ktg_fast.search")

SPEC_ATTR = "ktg_spec"
BUDGET_ATTR = "ktg_trials"


def make_sampler(name: str, seed: Optional[int] = None) -> optuna.samplers.BaseSampler:
    """``random`` (the paper's) or ``tpe`` (constant liar, for parallel workers).

    Workers must not share a seed or they would draw the same graphs: leave
    ``seed`` None (fresh entropy per worker) outside tests.
    """
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise SearchError(f"--sampler must be random or tpe; got {name!r}")


def make_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving: rungs at min_resource * rf^(esr + k) epochs."""
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=int(spec["min_resource"]),
                                                  reduction_factor=int(spec["reduction_factor"]),
                                                  min_early_stopping_rate=int(spec["min_early_stopping_rate"]))


def _check_spec(study: optuna.Study, cfg: SearchConfig, url: str) -> None:
    theirs = study.user_attrs.get(SPEC_ATTR)
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise SearchError(f"study {study.study_name!r} in {mask_url(url)} holds trials but was not created by "
                              "ktg_fast.search: choose another --study name")
        return
    mine = cfg.study_spec()
    diffs = spec_differences(theirs, mine)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise SearchError(f"study {study.study_name!r} in {mask_url(url)} was created with other settings "
                          f"(study vs this command: {shown}): pass the same settings to join it, or choose "
                          "another --study (or --out)")


def create_or_join(cfg: SearchConfig, *, trials_given: bool) -> tuple[optuna.Study, bool]:
    """Create the study, or join an existing one after checking its settings.

    Args:
        trials_given: ``--trials`` was passed: it becomes the study's budget.

    Returns:
        (study, created).
    """
    url = cfg.storage_url()
    storage = open_storage(url)
    name = cfg.study_name()
    spec = cfg.study_spec()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
            created = False
        except KeyError:
            try:
                study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
                created = True
            except optuna.exceptions.DuplicatedStudyError:  # another machine created it just now
                study = optuna.load_study(study_name=name, storage=storage)
                created = False
    if not created:
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise SearchError(f"study {name!r} in {mask_url(url)} minimises its objective; it is not a ktg_fast "
                              "search: choose another --study name")
        _check_spec(study, cfg, url)
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_ATTR, spec)
    old = study.user_attrs.get(BUDGET_ATTR)
    cfg.check_budget(cfg.trials if (old is None or trials_given) else int(old))
    if old is None or (trials_given and int(old) != cfg.trials):
        if old is not None:
            log.info("trial budget of study %r changed from %s to %d", name, old, cfg.trials)
        study.set_user_attr(BUDGET_ATTR, int(cfg.trials))
    else:
        cfg.trials = int(old)
    return study, created


def load_search_study(cfg: SearchConfig, storage: Any) -> optuna.Study:
    """Load the (existing) study with this worker's sampler and the study's pruner."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.load_study(study_name=cfg.study_name(), storage=storage,
                                      sampler=make_sampler(cfg.sampler), pruner=make_pruner(cfg.study_spec()))
        except KeyError:
            raise SearchError(f"no study {cfg.study_name()!r} in {mask_url(cfg.storage_url())}: start the search "
                              "with `python -m ktg_fast.search ...` first") from None
    _check_spec(study, cfg, cfg.storage_url())
    return study


def open_for_reading(url: str, name: Optional[str]) -> optuna.Study:
    """Load a study without heartbeats (export, progress); ``name`` None picks the only study in the storage."""
    storage = open_storage(url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = optuna.get_all_study_names(storage)
        if name is None:
            if len(names) != 1:
                raise SearchError(f"{mask_url(url)} holds {len(names)} studies ({', '.join(names) or 'none'}): "
                                  "pick one with --study")
            name = names[0]
        if name not in names:
            raise SearchError(f"no study {name!r} in {mask_url(url)}; studies there: {', '.join(names) or 'none'}")
        return optuna.load_study(study_name=name, storage=storage)
