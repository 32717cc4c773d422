"""What every benchmark needs: the machine's description, the results folder and offline data."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import Tensor

RESULTS = Path(__file__).parent / "results"


def publish(path: Path, lines: list[str], *, write: bool = True) -> None:
    """Print a results table and, unless ``write`` is false, write it to ``path``."""
    text = "\n".join(lines) + "\n"
    print(text)
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def load_mnist1d(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """mnist1d from its offline generator (never the downloader): 4000 + 1000 signals of 40."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt)  # noqa: E731
    return (
        as_t(d["x"], torch.float32),
        as_t(d["y"], torch.long),
        as_t(d["x_test"], torch.float32),
        as_t(d["y_test"], torch.long),
    )
