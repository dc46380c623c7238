"""Size-aware routing between denoiser deployments: which one serves a request, by its pixel count.

The main denoiser (`denoiser` / `denoiser_deployment`, deployment `Denoiser`) serves every size below
the smallest `denoiser_routes[].min_pixels`; a request of height x width >= a route's `min_pixels` goes
to the route with the largest such threshold (deployment `Denoiser-<name>`). Pure: the config validates
with it and the ingress routes with it.
"""

from __future__ import annotations

from typing import Protocol, Sequence, TypeVar

MAIN_DEPLOYMENT = "Denoiser"


class _Route(Protocol):
    name: str
    min_pixels: int


R = TypeVar("R", bound=_Route)


def route_deployment_name(route: str) -> str:
    """The Serve deployment name of route `route` (the main denoiser is `MAIN_DEPLOYMENT`)."""
    return f"{MAIN_DEPLOYMENT}-{route}"


def choose_route(pixels: int, routes: Sequence[R]) -> R | None:
    """The route with the largest `min_pixels` at or below `pixels`; None: the main denoiser."""
    best = None
    for r in routes:
        if pixels >= r.min_pixels and (best is None or r.min_pixels > best.min_pixels):
            best = r
    return best
