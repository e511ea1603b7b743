"""Install ktg_fast; the Triton kernels in kernels/ install as ``ktg_fast.kernels``."""
from setuptools import setup

setup(
    name="ktg_fast",
    version="0.1.0",
    description="Fast training and search of knowledge transfer graphs (Minami et al.)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        "ktg_fast",
        "ktg_fast.models",
        "ktg_fast.data",
        "ktg_fast.kernels",
        "ktg_fast.search",
        "ktg_fast.steps",
    ],
    # kernels/ lives at the top of the repository but is never a top-level module.
    package_dir={"ktg_fast": "ktg_fast", "ktg_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6",
        "torchvision>=0.21",
        "numpy",
        "pyyaml",
        "tqdm",
        "optuna>=4.0",
        "matplotlib",
        "pillow",
    ],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "pytest-timeout",
            "pytest-xdist",
            "graphviz",
            "optuna-dashboard",
        ],
        "dali": ["nvidia-dali-cuda130"],
        "postgres": ["psycopg2-binary"],
        # Baselines some benchmarks compare with, where installed (bench/test_bench_linear_loss.py).
        "bench": ["liger-kernel"],
    },
)
