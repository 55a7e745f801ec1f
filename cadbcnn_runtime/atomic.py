"""One way to write a file that readers never see half-written (models, specs, reports)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(dest: Path, data: bytes) -> None:
    """Write DATA to DEST through a temporary file in the same folder, fsync'd, then ``os.replace``: a reader sees
    the old file or the new one, never a part, and a failed write leaves no temporary file behind. The new file gets
    the permissions a plain ``open(dest, "wb")`` would (the umask's). OSError propagates to the caller, who knows
    what the file is and how to word the fix."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent if str(dest.parent) else ".", prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
