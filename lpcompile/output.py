"""Output directories: lpcompile never destroys what the user did not create.

    check_output_dir(out, protected=[model_path, calibration_path])   # before any work
    write_output(out, fill)                                            # fill(tmp_dir) writes the files

An output directory is written only when it is new, empty, or a previous lpcompile output: one
whose marker file (MARKER, written into every output) or, for outputs older than the marker, whose
report.json lists every entry it holds. A previous output holding anything else (a user's notes) is
not ours to replace. The output may not be, or hold, the model or the calibration data.

`write_output` fills a sibling temporary directory, `.{name}.lpcompile-tmp-{pid}-XXXX`, and swaps
it in when complete: on Linux with renameat2(RENAME_EXCHANGE), so the path never stops holding a
complete output; elsewhere by two renames (the old output parked as
`.{name}.lpcompile-old-{pid}-XXXX` in between). Leftovers of earlier runs that were killed (their
pid no longer alive) are removed, and a parked old output whose run died before the second rename
is put back. Every failure is one LpcompileError line; the temporary directory is removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from lpcompile.errors import LpcompileError

__all__ = ["MARKER", "check_output_dir", "write_output"]

MARKER = ".lpcompile-output"
MARKER_VERSION = 1
TMP, OLD = "tmp", "old"
# the report.json keys that say a legacy (marker-less) output is lpcompile's
_REPORT_KEYS = frozenset({"format", "target", "layers", "totals", "files"})


def _absolute(path: str | os.PathLike) -> Path:
    """`path` made absolute with symlinks resolved (as far as it exists), so `.`, `..` and links
    name the directory they are."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _stray_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.lpcompile-(?P<kind>{TMP}|{OLD})-(?P<pid>\d+)-[A-Za-z0-9_]+")


def _written_by_us(out: Path) -> set[str] | None:
    """The names a previous lpcompile output in `out` wrote (None: `out` is not one)."""
    try:
        marker = json.loads((out / MARKER).read_text())
        if isinstance(marker, dict) and isinstance(marker.get("files"), list):
            return {str(f) for f in marker["files"]} | {MARKER}
    except (OSError, ValueError):
        pass
    try:  # outputs written before the marker: their report lists the other files
        report = json.loads((out / "report.json").read_text())
        if isinstance(report, dict) and _REPORT_KEYS <= report.keys() and isinstance(report["files"], dict):
            return set(report["files"]) | {"report.json", "report.md"}
    except (OSError, ValueError):
        pass
    return None


def _is_within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(out: str | os.PathLike, protected: Sequence[str | os.PathLike] = ()) -> Path:
    """Refuse (one-line LpcompileError) an output directory that would destroy something the user
    did not create, or that cannot be written; `protected` are the inputs (the model, its external
    data, the calibration data) it may not be or hold. Returns the absolute output path."""
    shown = str(out)
    path = _absolute(out)
    if path.parent == path:
        raise LpcompileError(f"output {shown} is the filesystem root; give a new directory")
    for p in protected:
        p_abs = _absolute(p)
        if _is_within(p_abs, path):
            what = "is" if p_abs == path else "holds"
            raise LpcompileError(f"output {shown} {what} an input ({p}); give another output directory")
    if _is_within(_absolute(os.getcwd()), path):
        raise LpcompileError(f"output {shown} is the current directory (or holds it); give a new directory")
    if path.exists() and not path.is_dir():
        raise LpcompileError(f"output {shown} exists and is not a directory; give a new directory")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LpcompileError(f"cannot create output {shown}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise LpcompileError(f"cannot write output {shown}: {ancestor} is not writable")
    if path.is_dir():
        try:
            entries = set(os.listdir(path))
        except OSError as e:
            raise _os_error(e, shown) from None
        ours = _written_by_us(path)
        foreign = sorted(entries - ours) if ours is not None else sorted(entries)
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            kind = "a previous lpcompile output with other files" if ours is not None else "not an lpcompile output"
            raise LpcompileError(f"output {shown} is {kind} ({listed}); lpcompile replaces only its own outputs: "
                                 "give a new or empty directory")
    return path


def write_output(out: str | os.PathLike, fill: Callable[[Path], None],
                 protected: Sequence[str | os.PathLike] = ()) -> Path:
    """Call `fill(tmp)` to write the output's files into a fresh sibling directory of `out`, then
    put it in place of `out` atomically (see the module docstring). `out` is checked first
    (`check_output_dir`). Returns the absolute output path."""
    shown = str(out)
    path = check_output_dir(out, protected)  # nothing is created for a refused output
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if _clean_strays(path):  # an interrupted earlier run's output was put back: check it again
            check_output_dir(out, protected)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.lpcompile-{TMP}-{os.getpid()}-", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; an output follows the umask like any mkdir
        fill(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        (tmp / MARKER).write_text(json.dumps({"lpcompile": MARKER_VERSION, "files": files}) + "\n")
        _swap(tmp, path)
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(e, shown) from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _os_error(e: OSError, shown: str) -> LpcompileError:
    reason = e.strerror or errno.errorcode.get(e.errno or 0, type(e).__name__)
    where = f" ({e.filename})" if e.filename else ""
    return LpcompileError(f"cannot write output {shown}: {reason}{where}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _clean_strays(out: Path) -> bool:
    """Leftovers of earlier runs into `out` that died (pid gone): temporary directories are
    removed; if `out` is missing and such a run had parked the old output, it is put back
    (returns whether it was)."""
    pattern = _stray_pattern(out.name)
    strays = []
    for entry in out.parent.iterdir():
        m = pattern.fullmatch(entry.name)
        if m and int(m["pid"]) != os.getpid() and not _pid_alive(int(m["pid"])) and entry.is_dir():
            strays.append((m["kind"], entry))
    parked = sorted((e for kind, e in strays if kind == OLD), key=lambda e: e.stat().st_mtime)
    restored = bool(parked) and not os.path.lexists(out)
    if restored:
        os.rename(parked[-1], out)
        strays = [(k, e) for k, e in strays if e != parked[-1]]
    for _, entry in strays:
        shutil.rmtree(entry, ignore_errors=True)
    return restored


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl without it
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _swap(new: Path, out: Path) -> None:
    """`new` takes `out`'s place; `out`'s old content (if any) is removed afterwards."""
    if not os.path.lexists(out):
        os.rename(new, out)
        return
    if _exchange(new, out):  # `new` now holds the old output
        shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.lpcompile-{OLD}-{os.getpid()}-", dir=out.parent))
    os.rename(out, old)  # replaces the empty placeholder
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
