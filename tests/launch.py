"""
Run a repository script as a subprocess for a test, on one process or on N local torchrun processes. A run that
outlives its timeout fails the test with the Python stack of every process it started: they run with
PYTHONFAULTHANDLER=1 and get SIGABRT before SIGKILL, so a rare hang says where it is.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, nproc=1, env=None, timeout=120):
    """`script` (a path under the repository root) with `args`; returns the CompletedProcess (text output)."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    cmd = launcher + [os.path.join(ROOT, script)] + [str(a) for a in args]
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    p = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pids = [p.pid] + descendants(p.pid)  # the launcher first: torchrun would stop its workers
        for sig, wait in ((signal.SIGABRT, 1), (signal.SIGKILL, 0)):  # on SIGABRT faulthandler prints the stacks,
            for pid in pids:                                          # one process at a time
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
                time.sleep(wait)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(cmd)}\nstill running after {timeout} s. Its output ends:\n{out[-2000:]}\n"
                    f"and its stacks (SIGABRT, faulthandler):\n{err[-12000:]}", pytrace=False)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def descendants(pid):
    """The processes below pid, children first (from /proc: Linux; torchrun starts each worker in a session of its
    own, so a process group would not reach them)."""
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):  # not a process, or one that has just exited
            pass
    found, frontier = [], [pid]
    while frontier:
        frontier = [q for q, pp in parent.items() if pp in frontier]
        found += frontier
    return found
