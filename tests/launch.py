"""
Run a command as a subprocess for a test: a repository script on one process or on N local torchrun processes
(launch), or any command line such as `bash train.sh` (run). A command that outlives its timeout fails the test
with the Python stack of every process it started that is still alive: they run with PYTHONFAULTHANDLER=1 and get
SIGABRT (no core file) before SIGKILL, so a rare hang says where it is.
"""
import os
import resource
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, args, nproc=1, env=None, timeout=120):
    """`script` (a path relative to the repository root, or absolute) with `args`; returns the CompletedProcess."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc_per_node={nproc}"]
    return run(launcher + [os.path.join(ROOT, script)] + [str(a) for a in args], env=env, timeout=timeout)


def run(cmd, env=None, timeout=120):
    """The command line `cmd`, from the repository root; returns the CompletedProcess (text output)."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    no_core = lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # noqa: E731 (inherited by every child)
    with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=no_core) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(p.pid, signal.SIGABRT)  # faulthandler prints each one's threads
            out, err = p.communicate(timeout=30)
            pytest.fail(f"{' '.join(cmd)}\nstill running after {timeout} s. Its output ends:\n{out[-2000:]}\n"
                        f"and its stacks (SIGABRT, faulthandler):\n{err[-12000:]}", pytrace=False)
        except BaseException:  # e.g. KeyboardInterrupt: leave nothing running
            stop(p.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def stop(pid, sig):
    """Send sig to pid and then to each process below it, one at a time, then SIGKILL to any still alive. pid comes
    first: were a torchrun worker aborted first, torchrun would stop the others before their stacks print. Each is
    held by a pidfd, so a signal never reaches another process that has taken over an exited one's number."""
    handles = []
    for q in [pid] + descendants(pid):
        try:
            handles.append(os.pidfd_open(q))
        except ProcessLookupError:  # exited meanwhile
            pass
    for s, wait in ([(sig, 1)] if sig != signal.SIGKILL else []) + [(signal.SIGKILL, 0)]:
        for fd in handles:
            try:
                signal.pidfd_send_signal(fd, s)
            except ProcessLookupError:  # already exited
                continue
            time.sleep(wait)
    for fd in handles:
        os.close(fd)


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
