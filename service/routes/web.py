"""The demo page at ``/`` and the descriptions behind the problem ``type`` URIs."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from service.problems import PROBLEM_TYPES, Problem

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def demo_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


@router.get("/problems/{slug}", tags=["problems"], summary="What a problem type means")
async def problem_type(slug: str) -> dict[str, str | int]:
    kind = PROBLEM_TYPES.get(slug)
    if kind is None:
        raise Problem("not-found", f"expected one of the problem types {sorted(PROBLEM_TYPES)}, got {slug!r}")
    return {
        "type": f"/problems/{slug}",
        "title": kind.title,
        "status": kind.status,
        "description": kind.description,
    }
