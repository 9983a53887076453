"""Every command goes through one error path: a bad argument or bad input is one line on stderr,
``PROG: error: ...``, and exit 2; the codes agree across commands (app.errors)."""

from __future__ import annotations

import importlib

import pytest

from app.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    AppError,
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
