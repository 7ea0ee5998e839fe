"""The permission bits of checkpointed files, which git does not keep: it records only a
file's executable bit and writes what it restores with the umask. A checkpoint keeps the
umask of its take and the bits of the files that differ from what git would write under
it (`bits_entry`); a restore gives them back (`give_bits`). Kept as `<umask>\\0` then
`<bits> <path>\\0` per entry, in octal (`encode_modes`, `read_modes`)."""

import os
import stat
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Modes:
    """The permission bits of a checkpoint's files: `entries` holds the regular files whose
    bits are not those git writes under `umask` (`bits_entry`)."""

    umask: int
    entries: dict[bytes, int] = field(default_factory=dict)


def bits_entry(st_mode: int, umask: int) -> int | None:
    """A regular file's permission bits when they are not what git writes for it under
    `umask` (0666 or, executable for its owner, 0777, less the umask); else None."""
    if not stat.S_ISREG(st_mode):
        return None
    bits = stat.S_IMODE(st_mode)
    return None if bits == written_bits(st_mode, umask) else bits


def written_bits(st_mode: int, umask: int) -> int:
    """The bits git gives a file it writes: it keeps only the owner's executable bit."""
    return (0o777 if st_mode & stat.S_IXUSR else 0o666) & ~umask


def scan_bits(cwd: Path, paths: list[bytes], umask: int) -> Modes:
    """The entries of the files at `paths` under `cwd`, from the files."""
    modes = Modes(umask)
    base = os.fsencode(cwd)
    for path in paths:
        with suppress(OSError):
            mode = bits_entry(os.lstat(os.path.join(base, path)).st_mode, umask)
            if mode is not None:
                modes.entries[path] = mode
    return modes


def give_bits(cwd: Path, paths: set[bytes], wanted: Modes) -> None:
    """Give each regular file among `paths` its bits in `wanted`."""
    base = os.fsencode(cwd)
    for path in paths:
        full = os.path.join(base, path)
        try:
            info = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        bits = wanted.entries.get(path, written_bits(info.st_mode, wanted.umask))
        if stat.S_IMODE(info.st_mode) != bits:
            os.chmod(full, bits)


def read_modes(path: Path) -> Modes | None:
    """The `Modes` written to `path`; None when there is none (a checkpoint taken before
    capd kept modes, an index being changed) or it cannot be read."""
    try:
        fields = path.read_bytes().split(b"\0")
        modes = Modes(int(fields[0], 8))
        for line in fields[1:-1]:
            mode, _, name = line.partition(b" ")
            modes.entries[name] = int(mode, 8)
    except (OSError, ValueError):
        return None
    return modes if fields[-1] == b"" else None


def current_umask() -> int:
    """capd's umask, which the gits it runs write files with: read, not set and reset,
    where Linux shows it."""
    with suppress(OSError, ValueError), open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def encode_modes(modes: Modes) -> bytes:
    """`modes` as `read_modes` reads them."""
    lines = [b"%o\0" % modes.umask]
    lines += [b"%o %s\0" % (mode, name) for name, mode in sorted(modes.entries.items())]
    return b"".join(lines)
