"""``python -m benchmarks.ray_cluster``: app.batch on a real three-node Ray cluster on this machine, with a
node killed mid-run.

1. Starts a head (``ray start --head --port P --num-cpus 1 --node-ip-address 127.0.0.1``) and two
   worker nodes (``ray start --address 127.0.0.1:P --num-cpus 1``), each a separate set of processes
   with its own ``--temp-dir`` and agent ports, all on 127.0.0.1.
2. Writes :data:`SEQUENCES` synthetic hologram sequences and runs ``python -m app.batch --address
   127.0.0.1:P`` on them with three actors of half a CPU (one per node, beside one reader each).
3. Once a fifth of the frames are segmented, kills one worker node's raylet (SIGKILL); Ray restarts its
   actor and retries its tasks on the other nodes.
4. Checks the outputs: every sequence complete (one mask per frame, no duplicates, manifest entry),
   nothing half-written left; the summary shows the frames per node.
5. Stops the cluster in any case: the processes started here (found by their temp dirs) are killed by
   id. Every step has a deadline; the whole script gives up after :data:`DEADLINE_S`.

Writes the JSON (default ``benchmarks/results/ray_cluster.json``) and prints a per-node table.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from app.cli import Parser, main_of
from app.errors import EXIT_FAILURE, EXIT_OK
from app.files import write_text

PROG = "benchmarks.ray_cluster"
SEQUENCES = 6
FRAMES = 40
SIZE = 256
DEADLINE_S = 270.0
KILL_AT_FRACTION = 0.2
_REPO = Path(__file__).resolve().parent.parent
# Ray's node health check, tightened so the dead node is noticed in seconds (defaults: about 30 s).
FAST_FAILURE_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                    "RAY_health_check_timeout_ms": "1000"}


def cluster_env() -> dict[str, str]:
    """The environment of every process of the cluster and of the driver: this run's own token (Ray's
    token authentication, given to all of them), the fast health check."""
    return {**os.environ, **FAST_FAILURE_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


def start_node(temp_dir: Path, head_port: int, head: bool, env: dict[str, str]) -> None:
    """``ray start`` one node (its daemons outlive the command); raises on failure or after 90 s."""
    command = [ray_cli(), "start", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--temp-dir", str(temp_dir),
               "--dashboard-agent-listen-port", str(free_port()), "--metrics-export-port", str(free_port()),
               "--runtime-env-agent-port", str(free_port()), "--disable-usage-stats"]
    if head:
        command += ["--head", "--port", str(head_port), "--include-dashboard", "false"]
    else:
        command += ["--address", f"127.0.0.1:{head_port}"]
    done = subprocess.run(command, timeout=90, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"ray start failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux ``/proc``)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (parent, line)
    return table


def processes_under(temp_dirs: list[Path]) -> dict[int, str]:
    """pid -> command line of the processes ``ray start`` started with one of ``temp_dirs`` (named on
    their command line), and of all their descendants (the Ray workers)."""
    table = _processes()
    found = {pid: line for pid, (_, line) in table.items() if any(str(folder) in line for folder in temp_dirs)}
    grew = True
    while grew:
        children = {pid: line for pid, (parent, line) in table.items() if parent in found and pid not in found}
        found.update(children)
        grew = bool(children)
    return found


def raylet_of(temp_dir: Path) -> int:
    return next(pid for pid, line in processes_under([temp_dir]).items()
                if Path(line.split(" ", 1)[0]).name == "raylet")


def _signal(pid: int, number: int) -> None:
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        pass


def stop_cluster(temp_dirs: list[Path]) -> int:
    """Kill the cluster's processes by id (SIGTERM, then SIGKILL after 10 s); returns how many."""
    pids = list(processes_under(temp_dirs))
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    wait_until = time.monotonic() + 10
    while time.monotonic() < wait_until and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    return len(pids)


def segmented_frames(out: Path) -> int:
    """Masks written so far: in finished sequences and in the ones in flight."""
    return sum(1 for _ in out.glob("*/masks/*.png")) + sum(1 for _ in out.glob(".*.partial/masks/*.png"))


def finished_sequences(out: Path) -> int:
    manifest = out / "manifest.json"
    return len(json.loads(manifest.read_text())["sequences"]) if manifest.exists() else 0


def make_sequences(root: Path) -> list[Path]:
    from app import synth

    folders = []
    for number in range(SEQUENCES):
        folder = root / f"seq{number}"
        synth.main(["--out", str(folder), "--frames", str(FRAMES), "--size", str(SIZE), "--seed", str(500 + number)])
        folders.append(folder)
    return folders


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    deadline = started + DEADLINE_S
    work = Path(tempfile.mkdtemp(prefix="cellseg-raycluster-"))
    # Ray's socket paths must stay short: the temp dirs live directly under /tmp.
    temp_dirs = [Path(tempfile.mkdtemp(prefix=f"rc{name}-", dir="/tmp")) for name in ("h", "a", "b")]
    port = free_port()
    report: dict[str, Any] = {"sequences": SEQUENCES, "frames_per_sequence": FRAMES, "size": SIZE,
                              "head_port": port, "host": "127.0.0.1"}
    try:
        sequences = make_sequences(work / "data")
        env = cluster_env()
        for position, temp_dir in enumerate(temp_dirs):
            start_node(temp_dir, port, position == 0, env)
        report["cluster_started_s"] = round(time.perf_counter() - started, 1)
        out = work / "out"
        command = [sys.executable, "-m", "app.batch", *map(str, sequences), "--out", str(out),
                   "--address", f"127.0.0.1:{port}", "--actors", "3", "--set", "batch.cpus_per_actor=0.5",
                   "--set", "batch.cpus_per_reader=0.5", "--set", "batch.frames_per_block=4"]
        report["command"] = " ".join(command)
        log = (work / "batch.log").open("w")
        batch = subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
        killed_at = None
        victim = temp_dirs[1]
        while batch.poll() is None and time.perf_counter() < deadline:
            if killed_at is None and segmented_frames(out) >= KILL_AT_FRACTION * SEQUENCES * FRAMES:
                raylet = raylet_of(victim)
                _signal(raylet, signal.SIGKILL)
                killed_at = segmented_frames(out)
                report["killed"] = {"raylet_pid": raylet, "temp_dir": str(victim),
                                    "frames_segmented_before": killed_at,
                                    "sequences_finished_before": finished_sequences(out),
                                    "at_s": round(time.perf_counter() - started, 1)}
            time.sleep(0.2)
        if batch.poll() is None:
            batch.kill()
            report["error"] = f"app.batch did not finish within {DEADLINE_S:g} s"
        batch.wait(timeout=30)
        log.close()
        report["batch_exit_code"] = batch.returncode
        lines = (work / "batch.log").read_text().splitlines()
        report["ray_retry_lines"] = sum("retried" in line or "restart" in line.lower() for line in lines)
        report["batch_log_tail"] = lines[-3:]
        report.update(check_outputs(out, sequences))
    finally:
        report["processes_stopped"] = stop_cluster(temp_dirs)
        for folder in (work, *temp_dirs):
            shutil.rmtree(folder, ignore_errors=True)
        report["wall_s"] = round(time.perf_counter() - started, 1)
    ok = (report.get("batch_exit_code") == 0 and report.get("complete") and "killed" in report
          and report.get("nodes_used", 0) == 3)
    report["ok"] = bool(ok)
    write_text(args.json, json.dumps(report, indent=2) + "\n")
    print(format_report(report), file=sys.stderr)
    return EXIT_OK if ok else EXIT_FAILURE


def check_outputs(out: Path, sequences: list[Path]) -> dict[str, Any]:
    """Every sequence complete and listed in the manifest; the run summary's nodes."""
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    manifest = json.loads((out / "manifest.json").read_text())["sequences"] if (out / "manifest.json").exists() else {}
    per_sequence = {folder.name: len(list((out / folder.name / "masks").glob("*.png"))) for folder in sequences}
    complete = (all(count == FRAMES for count in per_sequence.values()) and sorted(manifest) == sorted(per_sequence)
                and not list(out.glob(".*.partial")))
    nodes = summary.get("nodes", {})
    return {"complete": complete, "masks_per_sequence": per_sequence,
            "duplicates_dropped": sum(result.get("duplicates_dropped", 0)
                                      for result in summary.get("sequences", {}).values()),
            "nodes_used": sum(1 for node in nodes.values() if node["frames"]), "nodes": nodes,
            "batch_summary": {key: summary.get(key) for key in ("wall_s", "frames", "fps", "pool", "counts",
                                                                 "failures")}}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{'node':<14} {'alive':>5} {'frames':>6}  sequences"]
    for node, entry in report.get("nodes", {}).items():
        lines.append(f"{node[:12]:<14} {str(entry.get('alive', '?')):>5} {entry['frames']:>6}  "
                     f"{', '.join(entry['sequences'])}")
    killed = report.get("killed", {})
    lines.append(f"killed a worker raylet after {killed.get('frames_segmented_before', '-')} frames; "
                 f"outputs complete: {report.get('complete')}; app.batch exit {report.get('batch_exit_code')}; "
                 f"{report['wall_s']} s in all; ok: {report['ok']}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="FILE", default=str(_REPO / "benchmarks" / "results" / "ray_cluster.json"),
                        help="where the report goes (default: benchmarks/results/ray_cluster.json)")
    return parser


def main(argv: list[str] | None = None) -> int:
    return main_of(PROG, build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
