"""``python -m ktg_fast.search``: see :mod:`ktg_fast.search.cli`."""
from ..cli_common import run_cli
from .cli import main

if __name__ == "__main__":
    run_cli(main, resume_hint="run the same command again to continue: the study resumes and re-runs the "
                              "interrupted trials")
