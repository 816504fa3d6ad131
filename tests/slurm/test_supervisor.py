"""The SLURM supervisor's signal handling in-process, without a cluster: a signal that arrives while
the main thread is inside an import, or while the previous signal is being recorded, must not crash it.

Python runs a signal handler between two bytecodes of the main thread, wherever it is: these tests put
the main thread in those places deterministically (a half-initialised module in sys.modules, a second
signal sent from inside the recording of the first).
"""

from __future__ import annotations

import builtins
import json
import os
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdiff_megatron.training import cluster
from nbdiff_megatron.training.faults import SIGNAL_FILE_ENV

# The training process stand-in: a grandchild of the supervisor (as torchrun's workers are) that
# listens for SIGUSR1, says so in a file, and reports the signals it got.
LISTENER = """
import json, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(signal.Signals(s).name))
open(sys.argv[1] + ".ready", "w").close()
deadline = time.monotonic() + 60
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.5)  # let a second signal arrive
json.dump(got, open(sys.argv[1], "w"))
"""
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call([sys.executable, *sys.argv[1:]]))"


@pytest.fixture
def handlers() -> Iterator[None]:
    """supervise() installs its handlers in this process: put pytest's back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in cluster.FORWARDED}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def _supervise_and_signal(tmp_path: Path) -> tuple[int, list[str]]:
    """Run the supervisor over launcher -> listener; send it SIGUSR1 once the listener listens."""
    report = tmp_path / "listener.json"
    ready = Path(f"{report}.ready")

    def send_when_ready() -> None:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR1)

    sender = threading.Thread(target=send_when_ready, daemon=True)
    sender.start()
    code = cluster.supervise([sys.executable, "-c", LAUNCHER, "-c", LISTENER, str(report)])
    sender.join(timeout=5)
    return code, json.loads(report.read_text()) if report.exists() else []


def test_a_signal_during_an_import_is_relayed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, handlers: None
) -> None:
    """A second SIGUSR1 arrives while psutil is being imported (the supervisor used to import it in
    its handler, so the nested handler found it half initialised: AttributeError, exit 1, job FAILED).

    Any `import psutil` from here on is made to look like a first import that a signal interrupts:
    while it runs, sys.modules holds a module without attributes and a second signal arrives."""
    monkeypatch.setenv(SIGNAL_FILE_ENV, str(tmp_path / "signal"))
    real_import = builtins.__import__
    interrupted: list[str] = []

    def import_interrupted_by_a_signal(name: str, *args: object, **kwargs: object) -> object:
        if name != "psutil" or interrupted:
            return real_import(name, *args, **kwargs)
        interrupted.append(name)
        with monkeypatch.context() as during_import:
            during_import.setitem(sys.modules, "psutil", types.ModuleType("psutil"))
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before the next line
            time.sleep(0.01)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", import_interrupted_by_a_signal)
    code, got = _supervise_and_signal(tmp_path)
    assert code == 0
    assert got and set(got) == {"SIGUSR1"}  # two signals sent at once may arrive as one


def test_a_second_signal_while_the_first_is_recorded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    handlers: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A second SIGUSR1 arrives while the supervisor writes the first to the signal file (SLURM's
    step daemon and srun both pass USR1 on): both are relayed, the file names the signal."""
    signal_file = tmp_path / "signal"
    monkeypatch.setenv(SIGNAL_FILE_ENV, str(signal_file))
    recorded: list[str] = []
    real_replace = os.replace

    def replace_and_signal(src: str, dst: str) -> None:
        recorded.append(Path(src).read_text())
        if len(recorded) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler runs before the next line
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_and_signal)
    code, got = _supervise_and_signal(tmp_path)
    assert code == 0
    assert recorded == ["SIGUSR1"]  # written once, by the first signal
    assert capsys.readouterr().out.count("SIGUSR1 received, passed on") == 2
    assert got and set(got) == {"SIGUSR1"}  # two signals sent at once may arrive as one
    assert not signal_file.exists()  # removed when torchrun ends


def test_the_handler_only_queues(tmp_path: Path) -> None:
    """The handler itself touches nothing but a list, so it can interrupt anything, itself included."""
    relay = cluster.SignalRelay(str(tmp_path / "signal"))
    relay.handle(signal.SIGUSR1, None)
    relay.handle(signal.SIGTERM, None)
    assert relay.pending == [signal.SIGUSR1, signal.SIGTERM]
    assert not (tmp_path / "signal").exists()
    relay.relay(None)
    assert relay.pending == [] and (tmp_path / "signal").read_text() == "SIGUSR1"
