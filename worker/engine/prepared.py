"""A request made ready to count: its model, profile, budget, layout and the texts to count."""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.catalog import CachingConfig, Catalog, ModelInfo, Profile
from worker.engine.budget import Budget, budget_for
from worker.engine.costs import pieces
from worker.engine.layout import Layout, build_layout
from worker.engine.memo import MessageMemo
from worker.engine.request import AssemblyRequest


@dataclass(slots=True)
class Prepared:
    req: AssemblyRequest
    info: ModelInfo
    profile: Profile
    budget: Budget
    layout: Layout
    texts: list[str]
    caching: CachingConfig = field(default_factory=CachingConfig)


def prepare(catalog: Catalog, req: AssemblyRequest, memo: MessageMemo | None = None) -> Prepared:
    """Resolve the model and profile and lay the request out (raises TokenheapError; a
    native part the provider would refuse is an InvalidRequest naming its path)."""
    info = catalog.model(req.model)
    profile = catalog.profile(req.budget.profile)
    budget = budget_for(req, info, profile)
    layout = build_layout(req, info, catalog.render, memo=memo)
    return Prepared(req, info, profile, budget, layout, pieces(layout), catalog.caching)
