"""Every runnable code block of docs/migrating.md runs (blocks marked ``# before`` are upstream)."""

import re
from pathlib import Path

import pytest

MIGRATING = Path(__file__).resolve().parent.parent / "docs" / "migrating.md"
BLOCKS = re.findall(r"```python\n(.*?)```", MIGRATING.read_text(), flags=re.DOTALL)
RUNNABLE = [block for block in BLOCKS if not block.lstrip().startswith("# before")]


def test_the_guide_has_before_and_after_blocks():
    assert len(RUNNABLE) >= 6 and len(BLOCKS) - len(RUNNABLE) >= 5


@pytest.mark.parametrize("block", RUNNABLE, ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_block_runs(block):
    exec(compile(block, str(MIGRATING), "exec"), {})


def test_compat_submodules_import_lazily():
    import xloss.compat as compat

    assert set(compat.SUBMODULES) <= set(dir(compat))
    assert compat.timm.BinaryCrossEntropy.__module__ == "xloss.compat.timm"
    assert callable(compat.speechbrain.bce_loss)
    with pytest.raises(AttributeError, match="no attribute 'keras'"):
        compat.keras  # noqa: B018
