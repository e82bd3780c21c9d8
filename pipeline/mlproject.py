"""The commands behind MLproject's entry points: DVC runs the stages, MLflow only launches them.

MLflow appends every -P parameter that MLproject does not declare as `--key value`, so each
becomes a `dvc exp run -S key=value` override and params.yaml stays the one home of defaults.

Usage: python -m pipeline.mlproject {main|train|evaluate} [--<params key> <value> ...]
"""

from __future__ import annotations

import difflib
import subprocess
import sys

from pipeline.config import PARAMS_FILE, flatten, load_config
from pipeline.errors import PipelineError, reports_errors

TARGETS = {"main": [], "train": ["train"], "evaluate": ["evaluate"]}


def overrides_from(args: list[str], known_keys: list[str]) -> list[str]:
    """Turn ['--train.max_epochs', '3', ...] into ['train.max_epochs=3', ...], checking each key."""
    if len(args) % 2:
        raise PipelineError(f"expected --<key> <value> pairs, got {' '.join(args)}")
    overrides = []
    for flag, value in zip(args[::2], args[1::2]):
        key = flag.removeprefix("--")
        if not flag.startswith("--") or key not in known_keys:
            guess = difflib.get_close_matches(key, known_keys, n=1)
            hint = f" (did you mean {guess[0]}?)" if guess else ""
            raise PipelineError(f"unknown parameter {flag!r}: not a key of {PARAMS_FILE}{hint}")
        overrides.append(f"{key}={value}")
    return overrides


def dvc_command(entry_point: str, overrides: list[str]) -> list[str]:
    # Without overrides a plain repro keeps params.yaml untouched; with them, `dvc exp run`
    # records the experiment so that it can be compared and applied later.
    if not overrides:
        return ["dvc", "repro", *TARGETS[entry_point]]
    settings = [part for override in overrides for part in ("-S", override)]
    return ["dvc", "exp", "run", *settings, *TARGETS[entry_point]]


@reports_errors
def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in TARGETS:
        raise PipelineError(f"usage: python -m pipeline.mlproject {{{'|'.join(TARGETS)}}} [--<key> <value> ...]")
    known_keys = list(flatten(load_config().to_dict()))
    command = dvc_command(args[0], overrides_from(args[1:], known_keys))
    print("+", " ".join(command), flush=True)
    sys.exit(subprocess.run(command).returncode)


if __name__ == "__main__":
    main()
