"""Creating, joining and checking a search's Optuna study.

The study stores its settings (``ktg_spec``) and its trial budget
(``ktg_trials``) as study user attributes, so every worker, on any machine,
checks that it runs the same search and reads the current budget.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import optuna

from .config import SearchConfig, sampler_seed, spec_differences  # sampler_seed: re-exported, defined in config.py
from .space import SearchError
from .storage import mask_url, open_storage, sqlite_path, storage_errors

__all__ = ["SPEC_ATTR", "BUDGET_ATTR", "make_sampler", "make_pruner", "create_or_join", "load_search_study",
           "open_for_reading", "sampler_seed", "trial_folders"]

log = logging.getLogger("ktg_fast.search")

SPEC_ATTR = "ktg_spec"
BUDGET_ATTR = "ktg_trials"


def make_sampler(name: str, seed: Optional[int] = None) -> optuna.samplers.BaseSampler:
    """``random`` (the paper's) or ``tpe`` (constant liar, for parallel workers).

    Workers must not share a seed or they would draw the same graphs: each
    worker passes :func:`sampler_seed` of its own index.
    """
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    raise SearchError(f"--sampler must be random or tpe; got {name!r}")


def trial_folders(out: Any) -> list[str]:
    """Names of the trial folders in ``<out>/trials`` (left by a study, possibly a lost one)."""
    folder = Path(out) / "trials"
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def _refuse_new_study_over_trials(cfg: SearchConfig, url: str, found: str) -> None:
    """Never start a new study where trial folders of another one exist (their results would be orphaned)."""
    folders = trial_folders(cfg.out)
    if not folders:
        return
    shown = ", ".join(folders[:3]) + (f" and {len(folders) - 3} more" if len(folders) > 3 else "")
    raise SearchError(f"{cfg.out} holds {len(folders)} trial folder{'s' if len(folders) != 1 else ''} ({shown} in "
                      f"{cfg.out_dir / 'trials'}) but {found}, so this would start a new study over them. Nothing "
                      f"was changed. If the study file was replaced or damaged, restore it; to start over "
                      f"deliberately, move {cfg.out_dir / 'trials'} and the study file aside (or use another --out)")


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
    db = sqlite_path(url)
    if db is not None and (not db.exists() or db.stat().st_size == 0):
        _refuse_new_study_over_trials(cfg, url, f"its study file {db} is " + (
            "empty (0 bytes)" if db.exists() else "missing"))
    storage = open_storage(url)
    name = cfg.study_name()
    spec = cfg.study_spec()
    with warnings.catch_warnings(), storage_errors(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        names = optuna.get_all_study_names(storage)
        if name not in names and cfg.study is None and db is not None and len(names) == 1:
            # search.json of an older version (no study name saved), in a renamed or copied folder
            log.info("resuming study %r of %s (the folder was renamed or copied)", names[0], db)
            name = cfg.study = names[0]
        if name in names:
            study = optuna.load_study(study_name=name, storage=storage)
            created = False
        else:
            _refuse_new_study_over_trials(cfg, url, f"{mask_url(url)} holds no study {name!r}" + (
                f" (studies there: {', '.join(names)})" if names else ""))
            try:
                study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
                created = True
            except optuna.exceptions.DuplicatedStudyError:  # another process created it just now
                study = optuna.load_study(study_name=name, storage=storage)
                created = False
        return _settle(study, created, cfg, url, name, spec, trials_given)


def _settle(study: optuna.Study, created: bool, cfg: SearchConfig, url: str, name: str, spec: dict,
            trials_given: bool) -> tuple[optuna.Study, bool]:
    """Check a joined study's settings; store the spec and the budget."""
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


def load_search_study(cfg: SearchConfig, storage: Any, *, seed: Optional[int] = None) -> optuna.Study:
    """Load the (existing) study with this worker's sampler (seeded with ``seed``) and the study's pruner."""
    with warnings.catch_warnings(), storage_errors(cfg.storage_url()):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            study = optuna.load_study(study_name=cfg.study_name(), storage=storage,
                                      sampler=make_sampler(cfg.sampler, seed), pruner=make_pruner(cfg.study_spec()))
        except KeyError:
            raise SearchError(f"no study {cfg.study_name()!r} in {mask_url(cfg.storage_url())}: start the search "
                              "with `python -m ktg_fast.search ...` first") from None
    _check_spec(study, cfg, cfg.storage_url())
    return study


def open_for_reading(url: str, name: Optional[str]) -> optuna.Study:
    """Load a study without heartbeats (export, progress); ``name`` None picks the only study in the storage."""
    storage = open_storage(url)
    with warnings.catch_warnings(), storage_errors(url):
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
