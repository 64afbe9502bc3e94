"""The protocol-agnostic control plane: what every protocol adapter asks about models
rather than of them. Health, metadata and config (which loaded model a name stands
for), statistics (which models a name covers), the repository (index, load, unload, in
the model-control mode's limits), the variants of each family and the traffic policy.

The servicers convert requests and answers and call this object (and the `DataPlane`
for inference); the choices (a family name stands for all its variants in statistics,
load/unload only in explicit mode, a variant's state from its versions) live here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from sparseserve.errors import ModelNotFound, SparseServeError
from sparseserve.registry import IndexEntry, LoadedModel, ModelRegistry, ModelState
from sparseserve.repository.manifest import VariantManifest
from sparseserve.routing.router import Family, Router
from sparseserve.routing.traffic import PolicyState


@dataclass(frozen=True, slots=True)
class VariantStatus:
    """One model of the repository as ListVariants describes it. `model`: the version
    that serves (None if none does); `manifest`: its manifest, or the one on disk."""

    name: str
    state: ModelState
    reason: str
    ready_versions: list[str]
    model: LoadedModel | None
    manifest: VariantManifest | None


@dataclass(frozen=True, slots=True)
class TrafficPolicyStatus:
    """The traffic policy file's state and the routes of the families asked about."""

    state: PolicyState
    families: list[Family] = field(default_factory=list)


class ControlPlane:
    def __init__(self, registry: ModelRegistry, router: Router, is_ready: Callable[[], bool]):
        self.registry = registry
        self.router = router
        self._is_ready = is_ready

    # -- health and metadata ----------------------------------------------------------

    def server_ready(self) -> bool:
        """Whether the server takes requests (startup models loaded, not draining)."""
        return self._is_ready()

    def model(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model a metadata/config call about `name` describes: the model, or
        the variant a family name goes to without a split draw (raises if none)."""
        return self.router.route(name, version, draw=False).model

    def model_ready(self, name: str, version: str = "") -> bool:
        try:
            self.model(name, version)
        except SparseServeError:
            return False
        return True

    def versions(self, name: str) -> list[int]:
        """The versions of model `name` that serve."""
        return self.registry.versions(name)

    def statistics(self, name: str = "", version: str = "") -> list[LoadedModel]:
        """The loaded versions a statistics call about `name` covers, by name and
        version: every one ("" name), one model's, or, for a family name (that is no
        model name), every loaded variant's. Raises the routing error if none."""
        by_family = bool(name) and not self.registry.has_model(name)
        models = [
            m
            for m in self.registry.loaded()
            if (not name or (m.family if by_family else m.name) == name)
            and (not version or m.version_label == version)
        ]
        if name and not models:
            self.model(name, version)  # raises the precise error
        models.sort(key=lambda m: (m.name, m.version))
        return models

    # -- repository -------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the repository or in memory, per version, with its state."""
        rows = self.registry.index()
        return [r for r in rows if r.state is ModelState.READY] if ready_only else rows

    async def load(self, name: str) -> None:
        """Load or reload `name` (explicit model-control mode only)."""
        self.registry.check_explicit_control()
        await self.registry.load(name)

    async def unload(self, name: str) -> None:
        """Stop serving `name` (explicit model-control mode only)."""
        self.registry.check_explicit_control()
        await self.registry.unload(name)

    # -- families ---------------------------------------------------------------------

    def variants(self, family: str = "") -> list[VariantStatus]:
        """Every model of the repository, or those of `family` (ModelNotFound if no
        model belongs to it), with its state and manifest."""
        grouped: dict[str, list[IndexEntry]] = {}
        for row in self.registry.index():
            grouped.setdefault(row.name, []).append(row)
        variants = [self._variant(name, rows) for name, rows in grouped.items()]
        if family:
            families = sorted({_family(v) for v in variants})
            if family not in families:
                raise ModelNotFound(
                    f"unknown family {family!r}; families: {', '.join(families) or 'none'}"
                )
            variants = [v for v in variants if _family(v) == family]
        return variants

    def _variant(self, name: str, rows: list[IndexEntry]) -> VariantStatus:
        ready = [row.version for row in rows if row.state is ModelState.READY]
        states = {row.state for row in rows}
        state = (
            ModelState.READY if ready
            else ModelState.LOADING if ModelState.LOADING in states
            else ModelState.UNAVAILABLE
        )  # fmt: skip
        reason = "; ".join(r.reason for r in rows if r.reason)
        if ready:
            model = self.registry.get(name)
            return VariantStatus(name, state, reason, ready, model, model.manifest)
        try:  # a model that does not serve: what its manifest says, if it can be read
            manifest = self.registry.repository.read(name).manifest
        except SparseServeError as exc:
            return VariantStatus(name, state, reason or str(exc), ready, None, None)
        return VariantStatus(name, state, reason, ready, None, manifest)

    def traffic_policy(self, family: str = "") -> TrafficPolicyStatus:
        """The policy file's state and the route of `family` (ModelNotFound if it is no
        family of the loaded models), or of every family."""
        families = self.router.families()
        if family and family not in families:
            raise ModelNotFound(
                f"unknown family {family!r}; families: {', '.join(sorted(families)) or 'none'}"
            )
        names = [family] if family else sorted(families)
        return TrafficPolicyStatus(self.router.policy.state, [families[n] for n in names])


def _family(variant: VariantStatus) -> str:
    """A model without a manifest is its own family."""
    return variant.manifest.family if variant.manifest else variant.name
