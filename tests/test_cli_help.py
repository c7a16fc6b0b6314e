"""``--help`` of every command works: a newcomer's first command must print usage, not a traceback
(``magitrain demo --help`` once failed on a ``%`` in an f-string help text, which argparse formats)."""

import importlib

import pytest

from magitrain.cli import COMMANDS

MODULES = sorted({module for module, _ in COMMANDS.values()} | {"magitrain.plan"})


@pytest.mark.parametrize("module", MODULES)
def test_help_prints_usage(module, capsys):
    try:
        code = importlib.import_module(module).main(["--help"])  # some mains return argparse's exit code
    except SystemExit as e:
        code = e.code
    assert code in (0, None)
    assert "usage:" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    from magitrain.cli import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
