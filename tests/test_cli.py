"""`specssm <command>`: unknown commands are named, every option of every command has a help text."""
import argparse

import pytest

from specssm.cli import COMMANDS, main


@pytest.mark.parametrize("argv,what", [(["bogus"], "unknown command 'bogus'"), ([], "no command given")])
def test_unknown_or_missing_command(argv, what, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"specssm: {what}\n"), err
    assert "usage: specssm <command>" in err and all(c in err for c in COMMANDS)


def test_help_lists_the_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: specssm <command>" in out and all(f"  {c} " in out for c in COMMANDS)


class _Parser(Exception):
    pass


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_a_help_text(command, monkeypatch):
    """Each command's parser, caught at parse_args before the command runs."""
    def grab(self, *a, **k):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parser) as e:
        main([command])
    parser = e.value.args[0]
    assert parser.prog == f"specssm {command}"
    missing = [a.option_strings for a in parser._actions if not a.help]
    assert missing == [], f"specssm {command}: options without help: {missing}"
