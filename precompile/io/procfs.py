"""Memory figures the Linux kernel reports in /proc, as bytes (None where they cannot be read: other systems)."""

from __future__ import annotations

from pathlib import Path


def proc_bytes(path: str, field: str) -> int | None:
    """The `field:  N kB` line of a /proc status file (/proc/meminfo, /proc/self/status), in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
