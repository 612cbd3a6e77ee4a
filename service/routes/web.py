"""The demo page at ``/`` and the descriptions behind the problem ``type`` URIs."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from service.problems import PROBLEM_TYPES, Problem

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def demo_page() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", media_type="text/html")


# Swagger UI and ReDoc from the copy the fastapi-offline package ships: /docs works without a network.
DOCS_ASSETS = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS_URL = "/static/docs"


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
    )


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        with_google_fonts=False,
    )


def mount_docs_assets(app: FastAPI) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")


@router.get(
    "/problems/{slug}",
    tags=["problems"],
    summary="What a problem type means",
    responses={404: {"description": "Unknown problem type", "content": {"application/problem+json": {}}}},
)
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
