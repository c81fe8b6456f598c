"""Whether a directory is ours alone: the runtime directory holds the sockets every tier
trusts and the config hand-off a restarted tier reads, so nobody else may be able to
replace what is in it.

Refused: the directory (if it exists) being a symlink, owned by another user, or writable
by its group or by others; a parent owned by another user (root excepted), or writable by
others without the sticky bit (/tmp, 1777 and root's, is fine). Parents that do not exist
yet are created by the daemon, 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

RUNTIME_DIR_FIX = (
    "give runtime.dir to the daemon's user alone (chown <user> DIR; chmod 700 DIR), "
    "or pick another, such as /run/daemon (systemd: RuntimeDirectory=daemon)"
)


def unsafe_directory(path: Path, uid: int | None = None) -> str | None:
    """Why `path` is not a directory that only user `uid` (by default ours) controls, or None."""
    uid = os.geteuid() if uid is None else uid
    path = Path(os.path.abspath(path))
    try:
        own = os.lstat(path)
    except FileNotFoundError:
        own = None
    except OSError as exc:
        return f"{path} cannot be inspected: {exc.strerror or exc}"
    if own is not None:
        if stat.S_ISLNK(own.st_mode):
            return f"{path} is a symlink (to {os.readlink(path)}), not a directory the daemon made"
        if stat.S_ISDIR(own.st_mode):
            if own.st_uid != uid:
                return f"{path} is owned by uid {own.st_uid}, not by the daemon's user (uid {uid})"
            if own.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                return f"{path} is writable by its group or by others (mode {stat.S_IMODE(own.st_mode):04o})"
    for parent in path.parents:
        try:
            info = os.stat(parent)  # a parent may be a link (/var/run -> /run): where it leads counts
        except FileNotFoundError:
            continue  # the daemon creates it
        except OSError as exc:
            return f"{parent} cannot be inspected: {exc.strerror or exc}"
        if info.st_uid not in (0, uid):
            return f"{parent}, a parent of {path}, is owned by uid {info.st_uid}: that user could replace it"
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            mode = stat.S_IMODE(info.st_mode)
            return f"{parent}, a parent of {path}, is writable by anyone without the sticky bit (mode {mode:04o})"
    return None
