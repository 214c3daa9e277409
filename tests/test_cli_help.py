"""`qoq --help` lists every subcommand; a typo gets the choices and a suggestion."""

from qoq.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "data", "export", "compare"):
        assert f"\n  {name} " in out
    assert "--model.help qoq.systems.PolicyOptimization" in out
    assert main([]) == 0


def test_typo_gets_the_choices(capsys) -> None:
    assert main(["fitt"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fitt' (did you mean 'fit'?)" in err and ", ".join(COMMANDS) in err
    assert len(err.strip().splitlines()) == 1
