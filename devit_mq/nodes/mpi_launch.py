"""Running a topology under ``mpirun``: the command line."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def _mpirun_base() -> list[str]:
    wrapper = Path(__file__).resolve().parents[2] / "launch" / "mpirun.sh"
    if wrapper.is_file():
        return ["bash", str(wrapper)]
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("mpirun not found: install the 'mpich' wheel (pip install mpich)")
    return [mpirun]


def mpirun_command(nprocs: int) -> list[str]:
    """The mpirun of this environment (the mpich wheel puts one next to python), via the launch/
    wrapper when present (it adds Open MPI's root/oversubscribe flags)."""
    return [*_mpirun_base(), "-n", str(nprocs)]
