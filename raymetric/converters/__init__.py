"""Dataset converters: the official folder layouts of four retrieval benchmarks to OML's dataset CSV.

| name     | dataset                   | train / validation                                    | extra columns |
|----------|---------------------------|-------------------------------------------------------|---------------|
| `cub`    | CUB-200-2011              | classes 1-100 / 101-200 (or the official image split) | boxes         |
| `cars`   | Stanford Cars (Cars196)   | classes 1-98 / 99-196 (or the official image split)   | boxes         |
| `sop`    | Stanford Online Products  | the official split (by product)                       | category      |
| `inshop` | DeepFashion In-shop       | the official split (by item): query and gallery sets  | category, boxes (``img/``) |

Paths are written relative to the dataset folder, so the CSV keeps working when the folder moves (a
shared mount on a cluster). ``python jobs/convert.py <name> <dataset folder>`` writes ``df.csv`` there
and checks it as training will.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import pandas as pd

from raymetric.converters.cars import convert_cars
from raymetric.converters.common import ConverterError
from raymetric.converters.cub import convert_cub
from raymetric.converters.inshop import convert_inshop
from raymetric.converters.sop import convert_sop

__all__ = ["CONVERTERS", "ConverterError", "convert_dataset", "write_dataset_csv"]


def write_dataset_csv(df: pd.DataFrame, dataset_root: str, name: str = "df.csv", *, check_files: bool = True) -> str:
    """Write a converted frame to ``<dataset_root>/<name>`` and check it as training does.

    Raises:
        DatasetError: the written CSV fails the dataset checks (for instance, images are missing).
    """
    from raymetric.data.csv import load_dataset_csv

    path = os.path.join(dataset_root, name)
    df.to_csv(path, index=False)
    load_dataset_csv(path, dataset_root, check_files=check_files)
    return path


def convert_dataset(name: str, dataset_root: str, args: dict | None = None) -> pd.DataFrame:
    """Convert the dataset in ``dataset_root`` with the converter registered as ``name``.

    >>> convert_dataset("mnist", ".")
    Traceback (most recent call last):
    ...
    raymetric.converters.common.ConverterError: unknown dataset 'mnist'; known: ['cars', 'cub', 'inshop', 'sop']
    """
    if name not in CONVERTERS:
        raise ConverterError(f"unknown dataset {name!r}; known: {sorted(CONVERTERS)}")
    if not os.path.isdir(dataset_root):
        raise ConverterError(f"dataset folder not found: {dataset_root}")
    converter = CONVERTERS[name]
    unknown = sorted(set(args or {}) - set(inspect.signature(converter).parameters))
    if unknown:
        raise ConverterError(f"converter {name!r} takes no argument(s) {unknown}")
    return converter(dataset_root, **(args or {}))


CONVERTERS: dict[str, Callable[..., pd.DataFrame]] = {
    "cub": convert_cub,
    "cars": convert_cars,
    "sop": convert_sop,
    "inshop": convert_inshop,
}
