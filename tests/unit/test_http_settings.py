"""The REST settings: bounds, the environment, and Triton's `--allow-http true|false`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from sparseserve.settings import Settings


def test_defaults_are_tritons_port_and_on() -> None:
    settings = Settings()
    assert (settings.allow_http, settings.http_port) == (True, 8000)
    assert settings.max_http_body_bytes == 64 * 1024 * 1024


@pytest.mark.parametrize(
    "field", [{"http_port": -1}, {"http_port": 65536}, {"max_http_body_bytes": 10}]
)
def test_out_of_bounds_is_refused(field: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match=next(iter(field))):
        Settings(**field)


def test_environment_turns_rest_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPARSESERVE_ALLOW_HTTP", "false")
    monkeypatch.setenv("SPARSESERVE_HTTP_PORT", "9000")
    settings = Settings.load()
    assert (settings.allow_http, settings.http_port) == (False, 9000)


def test_allow_http_flag_takes_only_true_or_false() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sparseserve", "serve", "--allow-http", "maybe"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "expected true or false, got 'maybe'" in result.stderr
