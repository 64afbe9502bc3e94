"""Which loaded model version serves a request: by model name, or by family name through
the traffic policy.

- A name the registry knows as a model (`digits-mlp.pruned90`) is that model; model
  names win over family names.
- Otherwise a family name (from the loaded variants' manifests) resolves by the
  family's policy: its `split` (a weighted random choice per request among the split's
  variants that are loaded), else its `default` variant, else the family's baseline
  (the variant whose manifest names no baseline). `version` then applies to the chosen
  variant.
- Every request a variant of a family answers, whichever name it used, may be shadowed
  by the family's `shadow` rule (see `sparseserve.routing.shadow`).

The family index is rebuilt only when the set of loaded versions or the policy changes,
so routing a request costs a couple of dict lookups.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate

from sparseserve.errors import ModelNotFound, ModelNotReady
from sparseserve.registry import LoadedModel, ModelRegistry
from sparseserve.routing.traffic import FamilyPolicy, PolicyFile, PolicyState


@dataclass(frozen=True, slots=True)
class ShadowPlan:
    """The shadow rule of a family, resolved to model names: `targets` are (variant,
    model name) pairs, in the policy's order; a variant not loaded has model name ""."""

    fraction: float
    targets: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Route:
    model: LoadedModel
    shadow: ShadowPlan | None = None


@dataclass(slots=True)
class Family:
    """A family as the loaded versions and the policy make it."""

    name: str
    variants: dict[str, str] = field(default_factory=dict)  # variant -> model name
    baselines: list[str] = field(default_factory=list)  # variants that claim to be it
    policy: FamilyPolicy | None = None
    # The split among loaded variants: cumulative weights and their model names.
    cumulative: list[float] = field(default_factory=list)
    split_models: list[str] = field(default_factory=list)
    shadow: ShadowPlan | None = None
    problems: list[str] = field(default_factory=list)  # policy entries that do not apply

    @property
    def baseline(self) -> str | None:
        return self.baselines[0] if len(self.baselines) == 1 else None

    def default_variant(self) -> str | None:
        """What a request without a random draw gets: the default, the heaviest split
        variant, or the baseline."""
        if self.policy is not None and self.policy.default is not None:
            return self.policy.default
        if self.policy is not None and self.policy.split:
            loaded = {v: w for v, w in self.policy.weights.items() if v in self.variants}
            if loaded:
                return max(loaded, key=lambda v: loaded[v])
        return self.baseline


class Router:
    """Resolves request names to loaded models (see the module docstring)."""

    def __init__(
        self, registry: ModelRegistry, policy: PolicyFile, rng: random.Random | None = None
    ):
        self.registry = registry
        self.policy = policy
        self._random = (rng or random.Random()).random
        self._generation = -1
        self._state: PolicyState | None = None
        self._families: dict[str, Family] = {}

    # -- the request path ---------------------------------------------------------------

    def route(self, name: str, version: str = "", draw: bool = True) -> Route:
        """The model that serves `name` at `version` and the shadow rule of its family.
        `draw` False: no random split choice (metadata calls get the heaviest variant)."""
        families = self.families()
        if self.registry.has_model(name):
            model = self.registry.get(name, version)
        else:
            family = families.get(name)
            if family is None:
                try:
                    self.registry.get(name, version)  # the precise error for a model name
                except ModelNotFound as exc:
                    served = ", ".join(sorted(families)) or "none"
                    raise ModelNotFound(
                        f"{exc}; it is no family either (families served: {served})"
                    ) from None
                raise AssertionError("unreachable: the registry does not know the name")
            model = self.registry.get(self._pick(family, draw), version)
        shadow_family = families.get(model.family)
        return Route(model, shadow_family.shadow if shadow_family is not None else None)

    def _pick(self, family: Family, draw: bool) -> str:
        """The model name a family request goes to."""
        if family.policy is not None and family.policy.split and not family.split_models:
            raise ModelNotReady(
                f"family {family.name!r}: none of the variants of its split "
                f"({', '.join(family.policy.split)}) is loaded; loaded variants: "
                f"{', '.join(sorted(family.variants)) or 'none'}"
                f"{_names_hint(family, family.policy.split)}"
            )
        if family.split_models and draw:
            index = bisect_right(family.cumulative, self._random() * family.cumulative[-1])
            return family.split_models[min(index, len(family.split_models) - 1)]
        variant = family.default_variant()
        if variant is None:
            if family.baselines:
                raise ModelNotReady(
                    f"family {family.name!r} has several baselines ("
                    f"{', '.join(sorted(family.baselines))}); name a default variant in the "
                    "traffic policy"
                )
            raise ModelNotReady(
                f"family {family.name!r} has no loaded baseline and no default variant in "
                f"the traffic policy; loaded variants: {', '.join(sorted(family.variants))}"
            )
        model = family.variants.get(variant)
        if model is None:
            raise ModelNotReady(
                f"family {family.name!r}: variant {variant!r} is not loaded; loaded "
                f"variants: {', '.join(sorted(family.variants)) or 'none'}"
                f"{_names_hint(family, [variant])}"
            )
        return model

    # -- the family index ---------------------------------------------------------------

    def families(self) -> dict[str, Family]:
        """Every family of the loaded versions, with its policy applied."""
        state = self.policy.state
        if self.registry.generation != self._generation or state is not self._state:
            self._families = _index(self.registry, state)
            self._generation = self.registry.generation
            self._state = state
        return self._families


def _index(registry: ModelRegistry, state: PolicyState) -> dict[str, Family]:
    families: dict[str, Family] = {}
    for model in sorted(registry.loaded(), key=lambda m: m.name):
        family = families.setdefault(model.family, Family(model.family))
        family.variants.setdefault(model.variant, model.name)
        manifest = model.manifest
        if (manifest is None or manifest.is_baseline) and model.variant not in family.baselines:
            family.baselines.append(model.variant)
    for name, family in families.items():
        policy = state.policy.families.get(name)
        if policy is not None:
            _apply(family, policy)
    for name in state.policy.families.keys() - families.keys():
        # A policy for a family with nothing loaded yet: reported, applied once it loads.
        family = families[name] = Family(name)
        family.problems.append(f"no model of family {name!r} is loaded")
        _apply(family, state.policy.families[name])
    return families


def _apply(family: Family, policy: FamilyPolicy) -> None:
    family.policy = policy

    def missing(variant: str, where: str) -> str:
        problem = f"variant {variant!r} in {where} is not loaded"
        if (meant := _variant_of(family, variant)) is not None:
            problem += f" (a policy names variants: {meant!r})"
        return problem

    if policy.default is not None and policy.default not in family.variants:
        family.problems.append(missing(policy.default, "default"))
    if policy.split:
        loaded = [(v, w) for v, w in policy.weights.items() if w > 0 and v in family.variants]
        family.problems += [missing(v, "split") for v in policy.split if v not in family.variants]
        family.split_models = [family.variants[v] for v, _ in loaded]
        family.cumulative = list(accumulate(w for _, w in loaded))
    if policy.shadow is not None:
        targets = tuple((v, family.variants.get(v, "")) for v in policy.shadow.variants)
        family.problems += [missing(v, "shadow") for v, model in targets if not model]
        family.shadow = ShadowPlan(policy.shadow.fraction, targets)


def _variant_of(family: Family, name: str) -> str | None:
    """The variant a policy meant where it wrote the model's name (`fam.pruned50`)."""
    prefix = f"{family.name}."
    return name.removeprefix(prefix) if name.startswith(prefix) else None


def _names_hint(family: Family, named: Iterable[str]) -> str:
    """What to write instead where a traffic policy names loaded models, not variants."""
    if any(_variant_of(family, name) in family.variants for name in named):
        return (
            f" (the traffic policy names models; it takes variant names, without "
            f"{family.name + '.'!r})"
        )
    return ""
