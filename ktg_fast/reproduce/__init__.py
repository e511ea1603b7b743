"""``python -m ktg_fast.reproduce``: the paper's Tables 1 and 2 (vanilla, KD, DML, searched graphs) in one
resumable command, with the paper's figures beside ours.

- :mod:`.paper`: the paper's figures and Table 2's rows (the one place they are written);
- :mod:`.plan`: the rows and the sub-runs (exact commands of ``train``, ``pretrain``, ``search``) filling them;
- :mod:`.probe`: a short throughput probe and the estimated time of each sub-run;
- :mod:`.runner`: running the sub-runs as subprocesses, skipping finished ones, resuming killed ones;
- :mod:`.table`: ``results.md``, ``results.json`` and the bar chart ``results.png``.
"""
from .paper import TABLE1, TABLE2, Figure, Table2Row
from .plan import Plan, Row, Run, Settings, build_plan
from .table import RowResult, collect, render

__all__ = ["TABLE1", "TABLE2", "Figure", "Table2Row", "Plan", "Row", "Run", "Settings", "build_plan", "RowResult",
           "collect", "render"]
