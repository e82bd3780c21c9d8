"""The params file's name, apart from its reader (config.py): the modules below the programs name it in
their messages without loading the config, which the training wing must not (docs/layout.md)."""

from pathlib import Path

PARAMS_FILE = Path("params.yaml")
