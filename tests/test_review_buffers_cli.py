"""Review: the bench and demo command lines reject bad arguments with a usage message."""

import pytest

from xloss import cli


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--tables", "nosuch"], "unknown table(s) nosuch"),
        (["bench", "--repeats", "-1"], "--repeats: must be at least 1, got -1"),
        (["bench", "--repeats", "0"], "--repeats: must be at least 1, got 0"),
        (["bench", "--warmup", "-2"], "--warmup: must be at least 0, got -2"),
        (["demo", "--threads", "0"], "--threads: must be at least 1, got 0"),
    ],
)
def test_cli_rejects_bad_arguments_before_running(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as done:
        cli.main([*argv, "--out-dir" if argv[0] == "bench" else "--out", str(tmp_path)])
    assert done.value.code != 0
    assert message in f"{done.value.code}{capsys.readouterr().err}"
    assert not list(tmp_path.iterdir())  # nothing ran
