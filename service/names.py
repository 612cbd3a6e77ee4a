"""The one pattern for model names and versions, checked before any filesystem access.

A name or version is one directory below ``models_dir``: it must never be ``.``, ``..``, hidden, or hold a
separator (``%2E%2E`` in a URL arrives here decoded as ``..``). The routes declare it on their path
parameters (422 before the handler runs), the registry checks it again on every call (admin and internal
callers alike), and the settings check the names they pin.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Path

# A letter or digit first (so no ".", "..", ".hidden" or "-option"), then letters, digits, "._-".
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME = re.compile(NAME_PATTERN)


class InvalidName(ValueError):
    """A model name or version outside :data:`NAME_PATTERN`."""


def check_name(kind: str, value: str) -> str:
    """``value`` when it is a valid ``kind`` ("model name", "version"); InvalidName otherwise."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise InvalidName(
            f"{kind}: expected letters, digits and '._-' starting with a letter or digit, got {shown}"
        )
    return value


def is_valid_name(value: str) -> bool:
    return bool(_NAME.fullmatch(value))


ModelNameParam = Annotated[
    str, Path(pattern=NAME_PATTERN, description="model name (a directory below models_dir)")
]
VersionParam = Annotated[
    str, Path(pattern=NAME_PATTERN, description="model version (a directory below the model's)")
]
