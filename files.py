"""Atomic writes: a file or a folder appears whole or not at all, so a kill mid-write keeps the previous version
and a reader never sees half of one. Imports nothing of ours (data, tokenizer, hf and the trainer use it)."""
import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path, write, binary=False):
    """write(f) fills a temporary file next to path; it is flushed to disk (fsync) and then renamed over path
    (atomic on POSIX: readers see the old file or the new one, never half of one)."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_folder(folder):
    """Yield a temporary folder next to `folder`; once the body finished, it replaces `folder`. A crash while
    writing leaves the old folder untouched (and a .tmp folder behind). A directory cannot be swapped in one
    rename, so a crash in the instant between the two renames leaves the old folder as .NAME.old-PID."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
