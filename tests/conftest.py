"""Shared test set-up: the Triton interpreter on CPU, markers, shared fixtures (helpers live in helpers.py)."""
import logging
import os

import pytest
import torch

# Two shared cores: more threads than that spin-wait against each other and against the
# worker subprocesses some tests start (which inherit the variable).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors in the interpreter (fp32 math).
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The search needs Optuna (and SQLAlchemy); a machine without them (a bare GPU box, see bench/gpu.sh)
# still runs every other test, and says what it left out.
try:
    import optuna  # noqa: F401
    collect_ignore_glob: list[str] = []
except ImportError:
    collect_ignore_glob = ["test_search_*.py"]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    """One Inductor cache for the session (compiled artifacts shared between tests and test files; set
    KTG_COMPILE_CACHE to a folder to keep it between sessions)."""
    from ktg_fast.steps import compile_cache_dir

    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    folder = compile_cache_dir(os.environ.get("KTG_COMPILE_CACHE") or tmp_path_factory.mktemp("inductor"))
    yield folder
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    convolutions only spin-wait on more, badly when another process shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def keep_threads():
    """The search sets torch threads and log levels of this process: put them back."""
    n = torch.get_num_threads()
    levels = {name: logging.getLogger(name).level for name in ("ktg_fast", "ktg_fast.search")}
    yield
    torch.set_num_threads(n)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def pytest_report_header(config):
    if collect_ignore_glob:
        return "optuna is not installed: tests/test_search_*.py not collected (pip install optuna)"
    return None


def _interpreter_problem() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here (ktg_fast.kernels.interpreter_problem)."""
    try:
        from ktg_fast.kernels import interpreter_problem
    except ImportError as e:
        return f"ktg_fast.kernels cannot be imported: {e}"
    return interpreter_problem()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    problem = _interpreter_problem()
    skip_kernel = pytest.mark.skip(reason=f"the Triton kernels cannot run here: {problem}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if problem and ("triton" in (params.get("impl"), params.get("loss_impl")) or "kernel" in item.keywords):
            item.add_marker(skip_kernel)


@pytest.fixture
def keep_logging():
    """The commands' main() set the ktg_fast loggers' levels; put them back."""
    levels = {n: logging.getLogger(n).level for n in ("ktg_fast", "ktg_fast.reproduce")}
    yield
    for n, level in levels.items():
        logging.getLogger(n).setLevel(level)
