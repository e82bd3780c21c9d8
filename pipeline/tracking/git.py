"""The commit a training's run records, and whether the work tree differs from it."""

from __future__ import annotations

import subprocess


def git_state(generated: list[str]) -> tuple[str, bool | None]:
    """The commit and whether tracked files differ from it; ("unknown", None) where git fails (no
    repository, no git, too few file descriptors): a failure says nothing of the files.

    dvc.lock and the `generated` paths (the pipeline's own outputs, committed for reference) are
    rewritten by the very run being tracked, so changes there do not make the tree dirty.
    """
    excluded = [f":(exclude){path}" for path in ["dvc.lock", *generated]]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changes = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None
    return commit, bool(changes.strip())
