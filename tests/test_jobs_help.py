"""Every job's --help is complete: how to run it locally and on a cluster, and a description for every option."""

import glob
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.py")))


def _help(path, capsys) -> str:
    spec = importlib.util.spec_from_file_location(f"job_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def undescribed_options(text: str) -> list[str]:
    """Options in argparse's help text that have no description.

    >>> undescribed_options("options:\\n  -h, --help  show this\\n  --out OUT\\n  --x  a thing\\n")
    ['--out OUT']
    """
    lines = text.splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if not m:
            continue
        described = m.group(2) or (i + 1 < len(lines) and re.match(r"^\s{6,}\S", lines[i + 1]))
        if not described:
            missing.append(m.group(1).strip())
    return missing


def test_there_are_jobs():
    assert {"train.py", "convert.py", "export.py"} <= {os.path.basename(p) for p in JOBS}


@pytest.mark.parametrize("path", JOBS, ids=os.path.basename)
def test_help_is_complete(path, capsys):
    text = _help(path, capsys)
    name = os.path.basename(path)
    assert text.startswith("usage:")
    assert f"python jobs/{name}" in text, "a local example"
    assert f"ray job submit --working-dir . -- python jobs/{name}" in text, "the cluster command"
    assert undescribed_options(text) == []


def test_train_help_lists_every_config_key(capsys):
    from raymetric.config import describe_keys

    text = _help(os.path.join(ROOT, "jobs", "train.py"), capsys)
    for line in describe_keys():
        assert line in text
    for option in ("--config", "--quiet", "--verbose"):
        assert option in text
