"""Failure isolation for stages batched with Serve's `@serve.batch` (text encoder, VAE): a batch whose
forward raises is run again item by item, and each item that still fails carries its own error back to
its own caller (`Failed`, raised again by `unwrap`), so its batch-mates get their results."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("ray.serve")


@dataclass
class Failed:
    error: BaseException


def run_isolated(fn: Callable[[list], list], items: list) -> list:
    """fn(items); if that raises, fn([item]) for each item, a `Failed` in place of each that raises."""
    try:
        return fn(items)
    except Exception as e:
        if len(items) == 1:
            return [Failed(e)]
        log.warning("a batch of %d failed (%s); running its items one by one", len(items), type(e).__name__)
    out: list[Any] = []
    for item in items:
        try:
            out.append(fn([item])[0])
        except Exception as e:
            out.append(Failed(e))
    return out


def unwrap(result: Any) -> Any:
    if isinstance(result, Failed):
        raise result.error
    return result
