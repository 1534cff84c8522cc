"""One CLI pattern: every command is registered (a module that fails to import is an error, not a
missing command), and ``--output`` is every command's output option, ``--out`` its deprecated alias."""

import pytest

import tpa.cli


def parse(argv):
    return tpa.cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv, dest", [
    (["data", "prepare", "shakespeare"], "out"),
    (["bench", "decode"], "out"),
    (["bench", "memory"], "output"),
    (["bench", "train"], "output"),
    (["bench", "generate"], "output"),
    (["ablate"], "output"),
    (["eval", "ppl", "--model", "m", "--data", "d"], "output"),
])
def test_output_option_and_its_deprecated_alias(argv, dest, capsys):
    assert getattr(parse(argv + ["--output", "DIR"]), dest) == "DIR"
    capsys.readouterr()
    assert getattr(parse(argv + ["--out", "OLD"]), dest) == "OLD"
    assert "--out is deprecated; use --output" in capsys.readouterr().err


def test_output_given_twice_is_an_error():
    with pytest.raises(SystemExit):
        parse(["data", "prepare", "shakespeare", "--output", "a", "--out", "b"])


def test_required_output_is_still_required(capsys):
    with pytest.raises(SystemExit):
        parse(["data", "prepare", "shakespeare"])
    assert "--output" in capsys.readouterr().err


def test_a_command_module_that_fails_to_import_fails_loudly(monkeypatch):
    monkeypatch.setattr(tpa.cli, "COMMAND_MODULES", [*tpa.cli.COMMAND_MODULES, "tpa.no_such_command"])
    with pytest.raises(ModuleNotFoundError, match="tpa.no_such_command"):
        tpa.cli.build_parser()


def test_handler_imports_the_implementation_when_the_command_runs(monkeypatch):
    args = parse(["bench", "memory"])
    assert "handler(tpa.bench.memory._run)" == args.func.__qualname__
    import tpa.bench.memory

    monkeypatch.setattr(tpa.bench.memory, "_run", lambda a: 7)
    assert args.func(args) == 7
