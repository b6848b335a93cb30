"""The run_dir as shared state: one writer at a time (a lock the OS frees when its holder dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

FIT = [sys.executable, "-m", "recon_lightning.fit", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
       "logger.name=none", "data.n_per_class=10", "data.n_test_per_class=5", "classifier.hidden=[32]",
       "classifier.bias=[true,false]", "classifier.init_scale=[1e-3,1e-3]"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def wait_for_lock_holder(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> int:
    lock = run_dir / ".lock"
    start = time.time()
    while time.time() - start < timeout:
        assert proc.poll() is None, "the first job ended before it was seen holding the lock"
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return proc.pid
        time.sleep(0.2)
    raise AssertionError("the first job never took the lock")


def test_second_writer_is_refused_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "run"
    # A: a long victim training; B starts on the same run_dir while A runs.
    a = subprocess.Popen([*FIT, f"run_dir={run_dir}", "stage=classifier", "trainer.max_epochs=1000000"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_lock_holder(run_dir, a)
        b = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed"], env=ENV, capture_output=True, text=True, timeout=300)
        assert b.returncode == 2, b.stderr[-2000:]
        assert f"error: run_dir {run_dir} is in use by another job (pid {a.pid})" in b.stderr
        assert "Traceback" not in b.stderr
        assert a.poll() is None  # A was not disturbed
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    # A crashed (SIGKILL): its lock went with it, the next job runs.
    c = subprocess.run([*FIT, f"run_dir={run_dir}", "stage=embed"], env=ENV, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-2000:]
    assert (run_dir / "embed/DONE.json").is_file()
