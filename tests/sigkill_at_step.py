"""Run a ktg_fast command line and SIGKILL it right before training step N (tests of resume).

    python tests/sigkill_at_step.py N ktg_fast.train --graph dml ...
    KTG_KILL_RANK=1 torchrun --nproc-per-node 2 tests/sigkill_at_step.py N ktg_fast.train ...   # rank 1 only
    KTG_KILL_SIGNAL=INT python tests/sigkill_at_step.py N ktg_fast.search ...                    # Ctrl-C instead

The kill comes from outside the library: every step path's ``__call__`` is wrapped here, so the
trainer's hot loop carries no test hook.
"""
import os
import runpy
import signal
import sys

from ktg_fast.steps import STEPS


def main() -> None:
    at, module = int(sys.argv[1]), sys.argv[2]
    # Under torchrun, KTG_KILL_RANK=r kills rank r alone (the others see their peer vanish).
    only = os.environ.get("KTG_KILL_RANK")
    if only is not None and os.environ.get("RANK", "0") != only:
        at = -1
    sys.argv = [module, *sys.argv[3:]]
    sig = getattr(signal, "SIG" + os.environ.get("KTG_KILL_SIGNAL", "KILL"))
    calls = {"n": 0}
    for cls in set(STEPS.values()):
        original = cls.__call__

        def wrapped(self, *args, _original=original, **kwargs):
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), sig)
            return _original(self, *args, **kwargs)

        cls.__call__ = wrapped
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
