"""The page at `/` (index.html, app.js, style.css) and an offline API reference at `/docs` (docs.html):
static files shipped in the package, no CDN, no build step."""

from __future__ import annotations

from pathlib import Path

from serve_app.openai_api import APIError

HERE = Path(__file__).resolve().parent
_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml"}


def path(name: str) -> Path:
    """A file of this folder by its bare name (nothing else: no subfolders, no `..`); 404 otherwise."""
    if name in {p.name for p in HERE.iterdir() if p.suffix in _TYPES}:
        return HERE / name
    raise APIError(404, f"no file {name[:64]!r}", code="not_found", type="invalid_request_error")


def media_type(name: str) -> str:
    return _TYPES[Path(name).suffix]
