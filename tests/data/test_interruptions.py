"""convert-brats and phantom interrupted by SIGTERM or SIGKILL: no worker or resource-tracker process outlives them,
and the next run succeeds and leaves no hidden partial folder (it removes the one a killed run left)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunet_missingmod.data.brats import convert_brats
from nnunet_missingmod.data.nifti import remove_stale_staging, staging_prefix
from nnunet_missingmod.data.phantom import make_phantom_dataset
from tests.conftest import FAST_CONFIG

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

#: Runs the CLI with every case job (conversion or phantom) held for a minute after announcing itself, so the test
#: can kill the command while its workers are busy. Top-level code: spawned workers re-import it as __mp_main__.
DRIVER = '''
import os, sys, time
from nnunet_missingmod.data import brats, phantom

_convert_case, _write_case = brats._convert_case, phantom._write_case

def hold():
    open(os.path.join(os.environ["MARKER_DIR"], f"started-{os.getpid()}"), "w").close()
    time.sleep(60)

def slow_convert_case(job):  # top-level functions: the pool pickles them by name
    hold()
    return _convert_case(job)

def slow_write_case(job):
    hold()
    return _write_case(job)

brats._convert_case = slow_convert_case
phantom._write_case = slow_write_case

if __name__ == "__main__":
    from nnunet_missingmod.cli import main
    sys.exit(main(sys.argv[1:]))
'''


@pytest.fixture(scope="module")
def brats_source(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("interrupt_brats")
    make_phantom_dataset(976, num_cases=3, num_test=0, seed=5, config=FAST_CONFIG, raw_folder=base / "raw",
                         brats_layout=base / "brats", missing_rate=0.3, progress=False, num_processes=1)
    return base / "brats"


def _children() -> dict[int, int]:
    """{pid: parent pid} of every process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _descendants(pid: int) -> set[int]:
    parents, found, frontier = _children(), set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphaned zombie may wait for a PID 1 that never reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _partials(raw: Path) -> list[str]:
    return sorted(p.name for p in raw.glob(".Dataset977_Interrupted.*")) if raw.is_dir() else []


@pytest.mark.parametrize("command", ["convert-brats", "phantom"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_interrupted_command_leaves_no_process_and_the_next_run_cleans_up(brats_source, tmp_path, sig, command):
    raw, markers = tmp_path / "raw", tmp_path / "markers"
    markers.mkdir()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log = tmp_path / "stderr.txt"
    children: set[int] = set()
    with open(log, "w") as stderr_file:
        arguments = ([str(brats_source)] if command == "convert-brats" else ["--num-cases", "3", "--num-test", "0",
                                                                            "--spacing", "4"])
        converter = subprocess.Popen(
            [sys.executable, str(driver), command, *arguments, "--dataset-id", "977", "--name", "Interrupted",
             "--raw", str(raw), "-np", "2"],
            env={**os.environ, "MARKER_DIR": str(markers)}, stdout=subprocess.DEVNULL, stderr=stderr_file)
    try:
        deadline = time.monotonic() + 90
        while not list(markers.iterdir()):  # a worker holds a case
            assert converter.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the conversion did not start"
            time.sleep(0.2)
        children = _descendants(converter.pid)
        assert len(children) >= 2  # workers and multiprocessing's resource tracker
        assert _partials(raw)  # the staging folder exists
        os.kill(converter.pid, sig)
        converter.wait(timeout=60)
        deadline = time.monotonic() + 20
        while [pid for pid in children if _running(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if _running(pid)], "processes outlived the converter"
    finally:
        for pid in [converter.pid, *children]:  # only what this test started, should the check fail
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        converter.wait()
    stderr = log.read_text()
    assert not (raw / "Dataset977_Interrupted").exists()
    if sig == signal.SIGTERM:
        assert converter.returncode == 2
        assert stderr.strip().splitlines()[-1].startswith(f"nnunet_missingmod {command}: error: interrupted by SIGTERM")
        assert not _partials(raw)  # removed on the way out
    else:
        assert converter.returncode == -signal.SIGKILL
        assert _partials(raw)  # nothing can run after SIGKILL: the next run must clean up

    if command == "convert-brats":
        folder = convert_brats(brats_source, 977, "Interrupted", raw_folder=raw, num_processes=1, progress=False)
    else:
        folder = make_phantom_dataset(977, num_cases=3, num_test=0, seed=0, name="Interrupted", config=FAST_CONFIG,
                                      raw_folder=raw, progress=False, num_processes=1)
    assert (folder / "dataset.json").is_file() and len(list((folder / "labelsTr").iterdir())) == 3
    assert not _partials(raw)


def test_only_folders_of_dead_processes_of_this_host_are_removed(tmp_path):
    final = tmp_path / "Dataset977_X"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ours_dead = tmp_path / (staging_prefix(final, "partial").rsplit("-", 2)[0] + f"-{dead.pid}-abc")
    ours_alive = tmp_path / (staging_prefix(final, "partial") + "abc")  # this process
    other_host = tmp_path / f".Dataset977_X.partial-elsewhere-{dead.pid}-abc"
    legacy = tmp_path / ".Dataset977_X.partial-abc"
    old_of_dead = tmp_path / (staging_prefix(final, "old").rsplit("-", 2)[0] + f"-{dead.pid}-xyz")
    for folder in (ours_dead, ours_alive, other_host, legacy, old_of_dead / final.name):
        folder.mkdir(parents=True)
    (old_of_dead / final.name / "dataset.json").write_text("{}")  # killed between the two renames of the swap
    removed = remove_stale_staging(final)
    assert sorted(removed) == sorted([ours_dead, old_of_dead])
    assert ours_alive.is_dir() and other_host.is_dir() and legacy.is_dir()
    assert (final / "dataset.json").is_file()  # the previous dataset was put back
