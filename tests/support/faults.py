"""Real faults of the machine for one command: a full disk or a read-only folder, made with
mounts in a user and mount namespace of the command's own, so nothing outside it is touched."""

from __future__ import annotations

import functools
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.project import tool_env


@functools.cache
def namespaces_work() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


def full_disk(folder: Path, kib: int = 64) -> str:
    """`folder` as a new, tiny file system, with copies of what it held."""
    folder, saved = shlex.quote(str(folder)), shlex.quote(f"{folder}.before-mount")
    return (f"mkdir -p {folder} && cp -a {folder} {saved} && mount -t tmpfs -o size={kib}k tmpfs {folder} "
            f"&& cp -a {saved}/. {folder}/ && rm -r {saved}")


def read_only(folder: Path) -> str:
    folder = shlex.quote(str(folder))
    return f"mkdir -p {folder} && mount --bind {folder} {folder} && mount -o remount,bind,ro {folder}"


def run_with(directory: Path, mounts: list[str], *command: str, **env: str) -> subprocess.CompletedProcess:
    """Run `command` in `directory`, with `env` added to its environment and `mounts` (full_disk,
    read_only) in place for it alone."""
    if not namespaces_work():
        pytest.skip("needs `unshare -rm` (user and mount namespaces) to give a command a full or read-only disk")
    script = " && ".join([*mounts, 'exec "$@"'])
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], cwd=directory, env={**tool_env(), **env},
                          capture_output=True, text=True)
