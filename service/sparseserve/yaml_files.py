"""Reading a YAML file into a pydantic model, with an error that says what is wrong where.

The manifest and the traffic policy are both hand-edited YAML: a user who gets one wrong
should read the file's path and the offending key in one line, not a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


def read_model(
    cls: type[Model], path: Path, what: str, error: type[Exception], empty_ok: bool = False
) -> Model:
    """Parse `path` and validate it as `cls`. Anything wrong raises `error` with a message
    naming the file, `what` it should be ("manifest") and each bad key. `empty_ok`: an
    empty file is `cls()`."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise error(f"{path}: cannot read {what}: not UTF-8 text ({exc})") from exc
    except RecursionError as exc:
        raise error(f"{path}: cannot read {what}: nested too deeply") from exc
    except (OSError, yaml.YAMLError) as exc:
        raise error(f"{path}: cannot read {what}: {exc}") from exc
    if data is None and empty_ok:
        return cls()
    if not isinstance(data, dict):
        raise error(f"{path}: {what} must be a mapping, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '<root>'}: {problem['msg']}"
            for problem in exc.errors()
        )
        raise error(f"{path}: invalid {what}: {problems}") from exc
