"""Every command goes through one error path: a bad argument or bad input is one line on stderr,
``PROG: error: ...``, and exit 2; the codes agree across commands (app.errors)."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys
import time
from pathlib import Path

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

COMMANDS = ("app.live", "app.replay", "app.export", "app.train", "app.evaluate", "app.synth", "benchmarks.fps",
            "app.info")


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
    "app.info": ["/no/such/weights.pt"],
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


# -- the flags every command shares (app.cli) ------------------------------------------------------------

SHARED = ("--config", "--set", "-v", "-q")
DEVICE = {"app.live": ("--device", "--half"), "app.replay": ("--device", "--half"),
          "app.evaluate": ("--device", "--half"), "benchmarks.fps": ("--device", "--half"),
          "app.export": ("--half",), "app.train": ("--device",), "app.synth": (), "app.info": ()}
REQUIRED = {"app.replay": ["SEQ"], "app.evaluate": ["--synthetic"], "app.synth": ["--out", "OUT"]}


@pytest.mark.parametrize("module", COMMANDS)
def test_every_shared_flag_is_in_help(module, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == EXIT_OK
    text = capsys.readouterr().out
    for flag in (*SHARED, *DEVICE[module], "--device", "--half"):
        shown = re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None
        assert shown == (flag in (*SHARED, *DEVICE[module])), (module, flag)


def _config_of(module, argv):
    from app.cli import config_from_args

    mod = importlib.import_module(module)
    parser = (getattr(mod, "build_parser", None) or mod._parser)()
    return config_from_args(parser.parse_args([*REQUIRED.get(module, []), *argv]))


@pytest.mark.parametrize("module", [m for m in COMMANDS if "--device" in DEVICE[m]])
def test_device_and_set_reach_the_model_config(module, monkeypatch, caplog):
    config = _config_of(module, ["--device", "cuda:1", "--set", "pipeline.batch_size=3", "-q"])
    assert (config.model.device, config.pipeline.batch_size) == ("cuda:1", 3)
    if "--half" in DEVICE[module]:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with caplog.at_level("WARNING"):
            assert _config_of(module, ["--half"]).model.precision == "fp16"
        assert "no CUDA device found, running fp32 on the CPU" in caplog.text


@pytest.mark.parametrize("module", [m for m in COMMANDS if "--half" in DEVICE[m] and m != "app.export"])
def test_half_on_the_cpu_is_one_line_and_exit_2(module, capsys, tmp_path):
    argv = [str(tmp_path) if arg == "SEQ" else arg for arg in REQUIRED.get(module, [])]
    code, lines = run_main(module, [*argv, "--device", "cpu", "--half"], capsys)
    assert code == EXIT_USAGE
    assert len(lines) == 1 and "--half runs fp16 on CUDA" in lines[0], lines


@pytest.mark.parametrize("module", [m for m in COMMANDS if "--device" in DEVICE[m]])
def test_an_unknown_device_is_one_line_and_exit_2(module, capsys):
    code, lines = run_main(module, [*REQUIRED.get(module, []), "--device", "tpu"], capsys)
    assert code == EXIT_USAGE and len(lines) == 1 and "unknown device 'tpu'" in lines[0], lines


def test_export_half_is_its_fp16_graph_and_takes_the_config():
    import app.export

    args = app.export.build_parser().parse_args(["--half", "--set", "model.precision=fp16"])
    assert args.fp16 and args.weights is None  # the weights default to model.weights


def test_quiet_synth_writes_nothing_on_stderr(tmp_path, capfd):
    import app.synth

    assert app.synth.main(["--out", str(tmp_path / "seq"), "--frames", "1", "--size", "32", "-q"]) == EXIT_OK
    assert capfd.readouterr().err == ""
    assert (tmp_path / "seq" / "images" / "000000.png").is_file()


# -- cellseg COMMAND (app.main) --------------------------------------------------------------------------

def test_cellseg_lists_every_command_and_each_one_is_its_module(capsys):
    from app.main import COMMANDS as REGISTRY
    from app.main import main

    assert main(["--help"]) == EXIT_OK
    listing = capsys.readouterr().out
    assert set(REGISTRY) == {"live", "replay", "export", "train", "evaluate", "synth", "bench", "info", "batch"}
    assert REGISTRY["bench"][0] == "benchmarks.fps" and REGISTRY["info"][0] == "app.info"
    for name, (module, _) in REGISTRY.items():
        assert f"  {name} " in listing
        if module in COMMANDS:
            assert callable(importlib.import_module(module).main)


def test_cellseg_runs_the_command_with_the_rest_of_the_arguments(capsys, tmp_path):
    from app.main import main

    assert main(["synth", "--out", str(tmp_path / "seq"), "--frames", "1", "--size", "32", "-q"]) == EXIT_OK
    assert (tmp_path / "seq" / "meta.json").is_file()
    assert main(["info", "/no/such.pt"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip().startswith("cellseg info: error: ")  # named as typed
    with pytest.raises(SystemExit) as exited:  # argparse's errors exit from the parser
        main(["replay", "seq", "--frobnicate"])
    assert exited.value.code == EXIT_USAGE
    assert capsys.readouterr().err.strip().startswith("cellseg replay: error: unrecognized arguments")


def test_cellseg_unknown_or_missing_command_is_one_line_and_exit_2(capsys, monkeypatch):
    import app.main

    assert app.main.main(["replya"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == "cellseg: error: unknown command 'replya'; did you mean 'replay'? (see --help)"
    assert app.main.main([]) == EXIT_USAGE
    assert "usage: cellseg COMMAND" in capsys.readouterr().err

    def missing(name):
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)

    monkeypatch.setattr(app.main.importlib, "import_module", missing)
    assert app.main.main(["batch", "x"]) == EXIT_USAGE
    assert capsys.readouterr().err.strip() == (
        "cellseg: error: 'batch' is not available in this installation (app.batch is missing)")


def test_python_dash_m_app_is_cellseg(repo_root):
    import subprocess

    done = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=repo_root, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and "usage: cellseg COMMAND" in done.stdout and "  bench " in done.stdout


def test_train_resume_takes_device(monkeypatch):
    import torch

    import app.train
    from app.training.trainer import TrainError

    asked = []

    def resume(path, device=None):
        asked.append((path, device))
        raise TrainError("stop here")

    monkeypatch.setattr(app.train.Trainer, "resume", resume)
    assert app.train.main(["--resume", "run.last.pt", "--device", "cpu"]) == EXIT_USAGE
    assert asked == [("run.last.pt", torch.device("cpu"))]


def test_evaluate_and_export_default_to_the_shipped_weights_from_any_directory(tmp_path, monkeypatch, capfd):
    import app.evaluate
    import app.export
    from app.resources import in_package

    monkeypatch.chdir(tmp_path)
    assert app.evaluate.main(["--synthetic", "--frames", "1", "--size", "64", "--device", "cpu", "-q"]) == EXIT_OK
    captured = capfd.readouterr()
    assert "mean" in captured.out and captured.err == ""
    shipped = Path(app.export.__file__).parent / "_data" / "weights" / "icnet_interferogram.pt"
    assert in_package(shipped) and not in_package(tmp_path / "w.pt")
    assert app.export.default_out(shipped) == Path("icnet_interferogram.onnx")  # never into the package
    assert app.export.default_out(tmp_path / "w.pt") == tmp_path / "w.onnx"
