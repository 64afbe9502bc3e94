"""The traffic policy: how a request that names a *family* is served, and which requests
are also run on other variants (shadow traffic) to compare them.

```yaml
families:
  digits-mlp:
    default: dense                        # the variant a family request gets
    split: {dense: 0.5, pruned90: 0.5}    # or: weighted random choice per request
    shadow: {variants: [dense], fraction: 0.1}
```

Variants are named as their manifests name them (`variant:`), within their family. The
file is validated strictly (unknown keys are errors, as in manifests and settings) and
re-read when it changes; a file that does not parse or validate leaves the policy in
force as it was, and the reason is logged and reported by `GetTrafficPolicy`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparseserve.yaml_files import read_model

log = logging.getLogger(__name__)

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class TrafficPolicyError(ValueError):
    """A policy file that cannot be read, parsed or validated; the message names it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShadowPolicy(_Strict):
    """Also run a sampled `fraction` of the family's requests on `variants`, after the
    answer is sent, and compare the outputs."""

    variants: list[str] = Field(min_length=1)
    fraction: Fraction = 1.0

    @field_validator("variants")
    @classmethod
    def _unique(cls, variants: list[str]) -> list[str]:
        if len(set(variants)) != len(variants):
            raise ValueError(f"variants are listed more than once: {variants}")
        if any(not v for v in variants):
            raise ValueError("a variant name is empty")
        return variants


class FamilyPolicy(_Strict):
    """How one family's requests are served. Neither `default` nor `split`: the family's
    baseline (the variant whose manifest names no baseline)."""

    default: str | None = Field(None, min_length=1)
    split: dict[str, float] | None = None
    shadow: ShadowPolicy | None = None

    @field_validator("split")
    @classmethod
    def _weights(cls, split: dict[str, float] | None) -> dict[str, float] | None:
        if split is None:
            return None
        if not split:
            raise ValueError("split is empty; name at least one variant with a weight")
        for variant, weight in split.items():
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"weight of {variant!r} is {weight}; weights are >= 0")
        if sum(split.values()) <= 0:
            raise ValueError("split weights sum to 0; give at least one variant a weight")
        return split

    @model_validator(mode="after")
    def _one_rule(self) -> FamilyPolicy:
        if self.default is not None and self.split is not None:
            raise ValueError("give either default or split, not both")
        return self

    @property
    def weights(self) -> dict[str, float]:
        """The split normalised to sum to 1 ({} without a split)."""
        if not self.split:
            return {}
        total = sum(self.split.values())
        return {variant: weight / total for variant, weight in self.split.items()}


class TrafficPolicy(_Strict):
    """The whole policy file: a `FamilyPolicy` per family name."""

    families: dict[str, FamilyPolicy] = Field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> TrafficPolicy:
        """Parse and validate a policy file; raise `TrafficPolicyError` saying what is
        wrong, where."""
        return read_model(cls, path, "traffic policy", TrafficPolicyError, empty_ok=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


@dataclass(frozen=True, slots=True)
class PolicyState:
    """The policy in force, where it came from, and what went wrong with the file since."""

    policy: TrafficPolicy
    source: Path | None
    loaded_at: float  # Unix time the policy in force was read (0: none read)
    error: str = ""  # why the file's current contents are not in force ("" if they are)


class PolicyFile:
    """The policy from a file, re-read by `refresh()` when the file changes.

    A refresh that finds the file gone, unparsable or invalid keeps the policy in force
    (the previous good one) and records why; fixing the file makes the next refresh
    apply it. Without a file the policy is empty."""

    def __init__(self, path: Path | None):
        self.path = path
        self.state = PolicyState(TrafficPolicy(), path, 0.0)
        self._stamp: tuple[int, ...] | None = None
        self.refresh()

    @property
    def policy(self) -> TrafficPolicy:
        return self.state.policy

    def refresh(self) -> bool:
        """Re-read the file if it changed; True if a new policy is now in force."""
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            policy = TrafficPolicy.read(self.path)
        except TrafficPolicyError as exc:
            kept = "the previous policy stays in force" if self.state.loaded_at else "no policy"
            log.error("traffic policy not applied (%s): %s", kept, exc)
            self.state = PolicyState(self.state.policy, self.path, self.state.loaded_at, str(exc))
            return False
        self.state = PolicyState(policy, self.path, time.time())
        log.info(
            "traffic policy from %s applied: %s",
            self.path, ", ".join(sorted(policy.families)) or "no families",
        )  # fmt: skip
        return True


def _stamp(path: Path) -> tuple[int, ...]:
    """Changes whenever the file is rewritten or replaced (ConfigMaps swap a symlink)."""
    try:
        st = path.stat()
    except OSError:
        return (-1,)
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
