"""Every runnable code block of the README and docs/migrating.md runs.

Blocks that start with ``# before`` show upstream code and are not run.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "migrating.md", ROOT / "docs" / "transformers.md"]


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def runnable(path):
    return [block for block in python_blocks(path) if not block.lstrip().startswith("# before")]


CASES = [(path, block) for path in DOCS for block in runnable(path)]


def test_the_guides_have_blocks():
    migrating = DOCS[1]
    assert len(runnable(migrating)) >= 6
    assert len(python_blocks(migrating)) - len(runnable(migrating)) >= 5
    assert len(runnable(DOCS[0])) >= 5  # a quickstart per loss family


@pytest.mark.parametrize(
    "path,block", CASES, ids=[f"{path.name}-{i}" for i, (path, _) in enumerate(CASES)]
)
def test_block_runs(path, block):
    exec(compile(block, str(path), "exec"), {})


def test_compat_submodules_import_lazily():
    import xloss.compat as compat

    assert set(compat.SUBMODULES) <= set(dir(compat))
    assert compat.timm.BinaryCrossEntropy.__module__ == "xloss.compat.timm"
    assert callable(compat.speechbrain.bce_loss)
    with pytest.raises(AttributeError, match="no attribute 'keras'"):
        compat.keras  # noqa: B018
