"""A small real filesystem for disk-full tests: a tmpfs mounted with ``size=``.

Only root (or a user namespace with mount rights) may mount, so
:func:`small_filesystem` yields ``None`` when mounting is not permitted and
the caller skips with that reason; it never fakes a full disk.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["small_filesystem"]


@contextmanager
def small_filesystem(directory: Path, size_bytes: int) -> Iterator[str | None]:
    """Mount a ``size_bytes`` tmpfs on ``directory`` for the duration of the block.

    Yields:
        None once mounted, or the reason mounting is not possible (to skip on).
    """
    directory.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        yield "no mount command"
        return
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        yield f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}"
        return
    try:
        yield None
    finally:
        # Lazy: an agent thread that still holds a file open must not keep the
        # mount (and the test's temporary directory) alive.
        subprocess.run(
            [shutil.which("umount") or "umount", "-l", str(directory)],
            capture_output=True,
            check=False,
        )
