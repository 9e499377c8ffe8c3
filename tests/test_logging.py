"""One channel for messages: the `ld3m_fast` logger, the one handler each `main()` call installs
(INFO and DEBUG on stdout, warnings on stderr), --quiet and --verbose, and a library that prints
nothing of its own."""
from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest

from ld3m_fast.cli import main as cli_main
from ld3m_fast.cli import presets as presets_command
from ld3m_fast.errors import LD3MError

from _workspace import assert_one_line_error, run_cli

PACKAGE = logging.getLogger("ld3m_fast")
SAYER = logging.getLogger("ld3m_fast.tests.sayer")
# The embedded default, planned small: a few seconds of fake-tensor walks.
PLAN = ["plan", "--ipc", "1", "--steps", "2", "--store-steps", "0", "--memory-budget", "4GiB"]
WALK = re.compile(r"chunk +\d+ decoder +\S+ micro-batch +\S+: peak ")  # one planner walk (DEBUG)


def _say_everything(args) -> int:
    """A stand-in command: the product on stdout, and one message at each level."""
    print("PRODUCT")
    SAYER.debug("a debug line")
    SAYER.info("an info line")
    SAYER.warning("a warning line")
    return 0


@pytest.fixture
def sayer(monkeypatch):
    """`ld3m-fast presets` runs `_say_everything` (the parser is built afresh by each main())."""
    monkeypatch.setattr(presets_command, "run", _say_everything)
    return ["presets"]


def test_info_on_stdout_warnings_on_stderr_debug_hidden(sayer, capsys):
    code, out, err = run_cli(sayer, capsys)
    assert code == 0
    assert out.splitlines() == ["PRODUCT", "an info line"]  # plain lines: no level, no logger name
    assert err.splitlines() == ["ld3m-fast: warning: a warning line"]


def test_quiet_keeps_the_product_and_the_warnings(sayer, capsys):
    for flag in ("--quiet", "-q"):
        code, out, err = run_cli([*sayer, flag], capsys)
        assert code == 0
        assert out.splitlines() == ["PRODUCT"]
        assert err.splitlines() == ["ld3m-fast: warning: a warning line"]


def test_verbose_adds_debug(sayer, capsys):
    for flag in ("--verbose", "-v"):
        code, out, err = run_cli([*sayer, flag], capsys)
        assert code == 0
        assert out.splitlines() == ["PRODUCT", "a debug line", "an info line"]
        assert err.splitlines() == ["ld3m-fast: warning: a warning line"]


def test_quiet_and_verbose_together_are_one_line_error(capsys):
    code, _, err = run_cli(["presets", "--quiet", "--verbose"], capsys)
    assert_one_line_error(code, err, "not allowed with argument")


def test_every_subcommand_takes_quiet_and_verbose():
    parser = cli_main.build_parser()
    leaves = list(cli_main._leaf_parsers(parser))
    names = {leaf.prog for leaf in leaves}
    assert {"ld3m-fast distill", "ld3m-fast eval", "ld3m-fast prior train", "ld3m-fast prior import"} <= names
    assert len(leaves) == len(cli_main.COMMANDS) + 1  # `prior` has two actions
    for leaf in leaves:
        flags = {option for action in leaf._actions for option in action.option_strings}
        assert {"--quiet", "-q", "--verbose", "-v"} <= flags, leaf.prog


def test_handlers_do_not_pile_up_and_the_level_is_restored(sayer, capsys):
    handlers, level = list(PACKAGE.handlers), PACKAGE.level
    for argv in (sayer, [*sayer, "--verbose"], [*sayer, "--quiet"], sayer):
        run_cli(argv, capsys)
        assert PACKAGE.handlers == handlers and PACKAGE.level == level
    _, out, _ = run_cli(sayer, capsys)
    assert out.count("an info line") == 1  # one handler, one copy


def test_the_handler_is_removed_when_a_command_fails(monkeypatch, capsys):
    def fail(args):
        SAYER.info("before the error")
        raise LD3MError("something the user can fix")

    monkeypatch.setattr(presets_command, "run", fail)
    handlers = list(PACKAGE.handlers)
    code, out, err = run_cli(["presets", "--quiet"], capsys)
    assert_one_line_error(code, err, "ld3m-fast presets: error: something the user can fix")  # --quiet or not
    assert "before the error" not in out
    assert PACKAGE.handlers == handlers

    def crash(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(presets_command, "run", crash)
    with pytest.raises(RuntimeError):
        cli_main.main(["presets"])
    assert PACKAGE.handlers == handlers


def test_other_ranks_of_a_torchrun_job_say_only_warnings(sayer, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, out, err = run_cli(sayer, capsys)
    assert code == 0
    assert out.splitlines() == ["PRODUCT"]
    assert err.splitlines() == ["ld3m-fast: warning: a warning line"]
    _, out, _ = run_cli([*sayer, "--verbose"], capsys)
    assert "an info line" in out


def test_the_handler_writes_to_the_streams_of_the_moment(capsys):
    """Looked up per record: a stream replaced after the handler was made still gets the line."""
    handler = cli_main.ConsoleHandler()
    record = logging.LogRecord("ld3m_fast.x", logging.INFO, __file__, 1, "now %s", ("here",), None)
    capsys.readouterr()
    handler.handle(record)
    assert capsys.readouterr().out == "now here\n"


def test_a_library_call_prints_nothing_without_a_handler(caplog):
    """Without the CLI, messages go to the `ld3m_fast` logger only: nothing on stdout or stderr,
    not even through logging's last-resort stderr handler (a fresh process: pytest's own handler
    would stand in for it here); a caller's logging setup receives them."""
    code = ("import logging\n"
            "from ld3m_fast.distill.config import DistillConfig, resolve_method_defaults\n"
            "resolve_method_defaults(DistillConfig())  # says which prior it picked\n"
            "logging.getLogger('ld3m_fast.anything').warning('a library warning')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")

    from ld3m_fast.distill.config import DistillConfig, resolve_method_defaults

    with caplog.at_level(logging.INFO, logger="ld3m_fast"):
        resolve_method_defaults(DistillConfig())
    (record,) = caplog.records
    assert record.name == "ld3m_fast.distill.config" and "embedded default prior" in record.getMessage()


def test_a_real_command_quiet_and_verbose(capsys):
    code, out, err = run_cli(PLAN, capsys)
    assert code == 0, err
    assert "using the embedded default prior" in out and "choice: --chunk" in out
    assert not WALK.search(out)

    code, out, err = run_cli([*PLAN, "--quiet"], capsys)
    assert code == 0, err
    assert "using the embedded default prior" not in out and "choice: --chunk" in out  # the product stays

    code, out, err = run_cli([*PLAN, "--verbose"], capsys)
    assert code == 0, err
    assert WALK.search(out)
