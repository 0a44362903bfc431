"""A side virtualenv with OML 4.0.0, for benchmarks that measure OML in the same run as raymetric.

OML 4.0.0 needs ``numpy<2``, which raymetric's environment does not have, so it lives in its own
virtualenv under ``.bench/oml-venv`` (ignored by git), created on first use. To avoid a second copy of
torch (several GB), the side venv sees the main environment's packages through a ``.pth`` file placed
*after* its own site-packages: its own ``numpy<2`` wins, torch and torchvision come from the main one.

    python bench/oml_env.py            # create (or check) it and print its python
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(ROOT, ".bench", "oml-venv")
OML = "open-metric-learning==4.0.0"
# OML's pipelines extra pins Lightning <= 2.1.2 and Hydra; numpy<2 is OML's own requirement.
PACKAGES = [f"{OML}", "numpy<2", "setuptools>=77.0.3,<81",  # Lightning 2.1 imports pkg_resources; torch 2.14 needs >=77
            "pytorch-lightning>=2.0,<=2.1.2", "hydra-core==1.3.0", "omegaconf"]


def oml_python() -> str:
    """Path of the side venv's python, creating and installing it on first use (a few minutes)."""
    python = os.path.join(VENV, "bin", "python")
    marker = os.path.join(VENV, ".installed")
    if os.path.exists(marker):
        return python
    if not os.path.exists(python):
        subprocess.run([sys.executable, "-m", "venv", VENV], check=True)
    # The main environment's site-packages, appended after the side venv's own.
    side_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    with open(os.path.join(side_site, "zz_main_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    # Pin torch and torchvision to the main environment's copies, so pip never installs others.
    import torch
    import torchvision

    pins = [f"torch=={torch.__version__.split('+')[0]}", f"torchvision=={torchvision.__version__.split('+')[0]}"]
    subprocess.run([python, "-m", "pip", "install", "-q", *PACKAGES, *pins], check=True)
    check = "import numpy, torch, oml, pytorch_lightning; print(numpy.__version__, torch.__version__, oml.__version__)"
    out = subprocess.run([python, "-c", check], check=True, capture_output=True, text=True).stdout.strip()
    with open(marker, "w") as f:
        f.write(out + "\n")
    return python


if __name__ == "__main__":
    path = oml_python()
    print(open(os.path.join(VENV, ".installed")).read().strip())
    print(path)
