"""Every command goes through one error path: a bad argument or bad input is one line on stderr,
``PROG: error: ...``, and exit 2; the codes agree across commands (app.errors)."""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

import pytest

from app import errors
from app.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    AppError,
    deferred_interrupts,
    describe,
    exit_code_for,
    first_line,
    guarded_main,
)

COMMANDS = ("app.live", "app.replay", "app.export", "app.train", "app.evaluate", "app.synth", "benchmarks.fps")


def run_main(module: str, argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    main = importlib.import_module(module).main
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own exits (--help) and Parser.error
        code = exc.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


@pytest.mark.parametrize("module", COMMANDS)
def test_an_unknown_flag_is_one_line_and_exit_2(module, capsys):
    code, lines = run_main(module, ["--no-such-flag"], capsys)
    assert code == EXIT_USAGE
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"python -m {module}: error: ") and lines[0].endswith("(see --help)"), lines
    assert "Traceback" not in lines[0]


BAD_INPUT = {
    "app.live": ["--source", "/no/such/video.mp4", "--no-display"],
    "app.replay": ["/no/such/folder"],
    "app.export": ["--weights", "/no/such/weights.pt"],
    "app.train": ["--set", "train.no_such_key=1"],
    "app.evaluate": ["--weights", "/no/such/weights.pt", "--synthetic"],
    "app.synth": ["--out", "OUT", "--set", "synth.size=-3"],
    "benchmarks.fps": ["--sections", "nonsense"],
}


@pytest.mark.parametrize("module", COMMANDS)
def test_bad_input_is_one_line_and_exit_2(module, capsys, tmp_path):
    argv = [str(tmp_path / "out") if arg == "OUT" else arg for arg in BAD_INPUT[module]]
    code, lines = run_main(module, argv, capsys)
    assert code == EXIT_USAGE, lines
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert "Traceback" not in "\n".join(lines)


def test_first_line_handles_empty_and_multiline_messages():
    assert first_line(ValueError("")) == "ValueError"
    assert first_line(ValueError("\n\n  second  \nthird")) == "second"
    assert first_line("") == ""
    assert first_line(None) == ""


def test_exit_codes_agree_for_every_kind_of_failure():
    class Failure(AppError):
        exit_code = EXIT_FAILURE

    assert exit_code_for(AppError("bad")) == EXIT_USAGE
    assert exit_code_for(Failure("broke")) == EXIT_FAILURE
    assert exit_code_for(FileNotFoundError("x")) == EXIT_USAGE
    assert exit_code_for(PermissionError("x")) == EXIT_USAGE
    assert exit_code_for(OSError(28, "No space left on device")) == EXIT_FAILURE
    assert exit_code_for(RuntimeError("bug")) == EXIT_FAILURE
    assert exit_code_for(KeyboardInterrupt()) == EXIT_INTERRUPTED
    assert describe(RuntimeError("bug")) == "RuntimeError: bug"
    assert describe(AppError("bad input")) == "bad input"


def test_a_stage_failure_is_exit_1_and_a_bad_background_found_on_the_first_frame_exit_2():
    from app.pipeline.hologram import HologramError
    from app.pipeline.runner import PipelineError

    assert exit_code_for(PipelineError("inference", 3, RuntimeError("boom"))) == EXIT_FAILURE
    assert exit_code_for(PipelineError("preprocess", 0, HologramError("wrong size"))) == EXIT_USAGE


def test_guarded_main_maps_interrupts_and_unexpected_errors(capsys):
    def interrupted() -> int:
        raise KeyboardInterrupt

    def broken() -> int:
        raise ZeroDivisionError("division by zero")

    assert guarded_main("prog", interrupted) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip() == "prog: interrupted"
    assert guarded_main("prog", broken) == EXIT_FAILURE
    assert capsys.readouterr().err.strip() == "prog: error: ZeroDivisionError: division by zero"


def test_every_project_error_is_an_app_error():
    from app.config import ConfigError
    from app.pipeline.backends import BackendError
    from app.pipeline.preprocess import PreprocessError
    from app.pipeline.sinks import SinkError
    from app.pipeline.sources import SourceError
    from app.synthesis.generator import SynthError
    from app.training.datasets import DatasetError
    from models import CheckpointError, ModelError

    for error in (ConfigError, BackendError, PreprocessError, SinkError, SourceError, SynthError, DatasetError,
                  CheckpointError, ModelError):
        assert issubclass(error, AppError), error


# -- Ctrl-C while outputs are being finished (app.errors.deferred_interrupts) --------------------------

class Exited(BaseException):
    """What the os._exit double raises: the code the process would have ended with."""


@pytest.fixture
def no_exit(monkeypatch):
    def fake_exit(code):
        raise Exited(code)

    monkeypatch.setattr(errors.os, "_exit", fake_exit)


def press() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # the handler runs in this (the main) thread before kill returns


def test_ctrl_c_inside_deferred_interrupts_stops_instead_of_raising_and_a_second_is_absorbed(capfd, restore_signals):
    before = signal.getsignal(signal.SIGINT)
    stops = []
    with deferred_interrupts(lambda: stops.append(True)) as interrupts:
        press()
        assert interrupts.interrupted and stops == [True]
        assert capfd.readouterr().err == ""  # the first press only stops
        press()
    assert stops == [True, True] and interrupts.presses == 2
    assert capfd.readouterr().err.strip() == (
        f"{os.path.basename(sys.argv[0])}: still finishing the outputs; Ctrl-C again within 2 s aborts")
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt):  # outside the block Ctrl-C raises again
        press()


def test_a_third_ctrl_c_soon_after_the_second_aborts_naming_what_is_unfinished(capfd, restore_signals, no_exit,
                                                                             monkeypatch):
    monkeypatch.setattr(errors, "ABORT_WINDOW_S", 0.2)
    with deferred_interrupts(unfinished=lambda: ["inference (frame 7)", "sinks (run.gif)"]):
        press()
        press()
        time.sleep(0.3)
        press()  # too long after the second: absorbed too
        with pytest.raises(Exited) as exited:
            press()
    assert exited.value.args == (EXIT_INTERRUPTED,)
    assert capfd.readouterr().err.strip().splitlines()[-1] == (
        f"{os.path.basename(sys.argv[0])}: aborted by a third Ctrl-C; left unfinished: inference (frame 7), "
        "sinks (run.gif)")


def test_under_guarded_main_ctrl_c_after_the_first_is_absorbed_until_the_process_exits(capfd, restore_signals):
    def body() -> int:
        try:
            press()
        finally:  # finishing outputs after the first Ctrl-C: a second one must not cut this short
            press()
            print("outputs finished", file=sys.stderr)
        return EXIT_OK

    assert guarded_main("prog", body) == EXIT_INTERRUPTED
    assert capfd.readouterr().err.splitlines() == [
        "prog: still finishing the outputs; Ctrl-C again within 2 s aborts", "outputs finished", "prog: interrupted"]
    # Only the interpreter's exit is left, which would restore the default handler: kill by SIGINT, not 130.
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_an_error_that_leaves_threads_running_exits_at_once_with_its_line(capsys, no_exit, restore_signals):
    class Stuck(AppError):
        exit_code = EXIT_INTERRUPTED
        left_running = ("inference",)

    def body() -> int:
        raise Stuck("inference stage failed on frame 3: did not stop within 5 s; left running")

    with pytest.raises(Exited) as exited:
        guarded_main("prog", body)
    assert exited.value.args == (EXIT_INTERRUPTED,)
    assert capsys.readouterr().err.strip() == (
        "prog: interrupted: inference stage failed on frame 3: did not stop within 5 s; left running")


def test_bad_optics_are_one_line_and_exit_2(capsys):
    code, lines = run_main("app.replay", ["synthetic", "--set", "optics.wavelength_nm=-633"], capsys)
    assert code == EXIT_USAGE
    assert lines == ["app.replay: error: optics.wavelength_nm must be a number > 0, got -633.0"]
