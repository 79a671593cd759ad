"""The HTTP side of `kind-dit serve`: a JSON API and a web page, as a FastAPI app.

FastAPI + uvicorn because the API is a handful of JSON endpoints whose validation pydantic models
state (with 422 errors that name the field) and whose async handlers let one process queue and
batch requests while a worker thread runs torch; uvicorn serves it with nothing else to run.

    POST /generate  {"class_name": "3", "n": 4, "seed": 0, "steps": 50, "cfg_scale": 1.5,
                     "sampler": "ddim", "format": "png" | "npz"}  -> a PNG grid (default) or an
                     .npz (`format`, or `Accept: application/x-npz`) in `kind-dit sample`'s layout
    GET  /health    status, queue length, batches and samples so far
    GET  /model     model config summary, classes, defaults and limits
    GET  /cache     the loaded tailors and cache counters
    GET  /          the web page (page.html)
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import tempfile
import time
from collections.abc import Awaitable
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from kind.core.decomposition import PartsError, resolve_classes
from kind.core.diffusion import SAMPLERS, Diffusion, DiffusionConfig
from kind.core.images import image_grid, save_npz
from kind.core.seeds import SEED_MAX
from kind.serve.batcher import Batcher, Result
from kind.serve.cache import TailorCache
from kind.serve.draw import Settings
from kind.training.config import SampleConfig

log = logging.getLogger(__name__)

MAX_N = 64  # samples a request
MAX_CFG = 20.0
MAX_NAME = 1000  # characters of a class name (ImageNet's longest WordNet synonym lists: ~150)
NPZ = "application/x-npz"
EXAMPLE = 'a JSON object like {"class_name": "3", "n": 4}'  # what POST /generate takes
# the model config fields GET /model shows
SUMMARY = ("size", "image_size", "in_channels", "rank_learngene", "rank_tailor", "null_tailor",
           "decompose_adaln", "learn_sigma")  # fmt: skip


def prefers_npz(accept: str) -> bool:
    """Whether an Accept header asks for npz before png: npz with a q above 0 and no lower than
    png's (or a wildcard's). Written here: Starlette reads no Accept header, and a substring test
    took `application/x-npz;q=0` (not npz) for a request of npz."""
    q: dict[str, float] = {}
    for item in accept.split(","):
        media, *params = (p.strip() for p in item.split(";"))
        weight = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            q[media.lower()] = float(weight)
        except ValueError:
            continue  # a malformed entry names nothing
    png = max((q.get(m, 0.0) for m in ("image/png", "image/*", "*/*")), default=0.0)
    return q.get(NPZ, 0.0) > 0 and q[NPZ] >= png


class GenerateRequest(BaseModel):
    """POST /generate: n samples of one class. Unset fields take the parts' sampling defaults."""

    # strict: a JSON true or "2" is a mistake to name, not a number to guess (pydantic's lax
    # mode takes true for 1)
    model_config = ConfigDict(extra="forbid", strict=True)

    class_name: str = Field(min_length=1, max_length=MAX_NAME,
                            description="a class of the model (GET /model)")  # fmt: skip
    n: int | None = Field(None, ge=1, le=MAX_N, description="samples")
    seed: int = Field(0, ge=0, le=SEED_MAX, description="same seed, same samples")
    steps: int | None = Field(None, ge=1, description="sampling steps")
    cfg_scale: float | None = Field(None, ge=0, le=MAX_CFG, allow_inf_nan=False,
                                    description="classifier-free guidance; 1 = off")  # fmt: skip
    sampler: Literal["ddim", "ddpm"] | None = None
    format: Literal["png", "npz"] | None = Field(
        None, description=f"png (default) or npz; unset: by the Accept header ({NPZ})"
    )


def sample_defaults(manifest: dict) -> dict:
    """n, steps, cfg_scale, sampler and guided_channels for fields a request leaves unset: the
    parts' sampling defaults, as `kind-dit sample` takes them, and at most MAX_N images."""
    saved = SampleConfig.saved(manifest.get("sample"))
    return {
        "n": min(saved.per_class, MAX_N),
        "steps": saved.steps,
        "cfg_scale": saved.cfg_scale,
        "sampler": saved.sampler,
        "guided_channels": saved.guided_channels,
    }


def create_app(
    parts: str | Path,
    *,
    cache_tailors: int | None = None,
    cache_bytes: int | None = None,
    max_batch: int = 64,
    max_wait_ms: float = 50.0,
    device: torch.device | str = "cpu",
    vae: str | Path | None = None,
) -> FastAPI:
    """The app serving the parts directory `parts`; loads (and verifies) the learngene now, the
    tailors on demand into a cache of `cache_tailors` slots or of `cache_bytes` (default: room
    for every tailor). A latent model's samples decode with the VAE in `vae` (default: the one
    the parts record, which another machine may not have), as `kind-dit sample --vae` does."""
    cache = TailorCache(parts, cache_tailors, cache_bytes, device)
    manifest, full = cache.manifest, cache.full
    diffusion_config = DiffusionConfig.from_dict(manifest["diffusion"])
    defaults = sample_defaults(manifest)
    decode = None
    if manifest.get("latent") or vae:
        from kind.data.vae import decoder

        decode = decoder(manifest.get("latent") or {}, vae, cache.device)
    batcher = Batcher(cache, Diffusion(diffusion_config), max_batch, max_wait_ms, decode)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="kind-dit serve", lifespan=lifespan)
    app.state.cache, app.state.batcher = cache, batcher

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """One message naming each bad field and what it got, not pydantic's nested list."""
        content_type = request.headers.get("content-type")
        problems = [_body_problem(e, content_type) or _field_problem(e) for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": "; ".join(problems)})

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return resources.files("kind.serve").joinpath("page.html").read_text()

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = batcher.failure is None  # else every request fails: 503, for a load balancer
        content = {
            "status": "ok" if ok else batcher.failure,
            "queued": batcher.queued,
            "batches": batcher.batches,
            "samples": batcher.samples,
            "uptime_s": round(time.time() - started, 1),
        }
        return JSONResponse(content, status_code=200 if ok else 503)

    @app.get("/model")
    async def model() -> dict:
        tailor = next(iter(manifest["tailors"].values()))
        return {
            "parts": str(cache.parts.resolve()),
            "model": {k: getattr(full, k) for k in SUMMARY},
            "classes": manifest["classes"],
            "diffusion": manifest["diffusion"],
            "defaults": defaults,
            "limits": {
                "n": [1, MAX_N],
                "seed": [0, SEED_MAX],
                "steps": [1, diffusion_config.num_timesteps],
                "cfg_scale": [0, MAX_CFG],
                "sampler": list(SAMPLERS),
            },
            "sizes": {
                "learngene": {k: manifest["learngene"][k] for k in ("params", "bytes")},
                "tailor": {k: tailor[k] for k in ("params", "bytes")},
            },
            "server": {
                "max_batch": batcher.max_batch,
                "max_wait_ms": batcher.max_wait * 1000,
                "cache_capacity": cache.capacity,
                "device": str(cache.device),
            },
        }

    @app.get("/cache")
    async def cache_stats() -> dict:
        return cache.stats()

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        try:
            (class_id,) = resolve_classes(full, [body.class_name])
        except PartsError as e:
            raise HTTPException(422, f"class_name: {e}") from None
        steps = body.steps if body.steps is not None else defaults["steps"]
        if steps > diffusion_config.num_timesteps:
            raise HTTPException(
                422, f"steps: must be in 1..{diffusion_config.num_timesteps} (got {steps})"
            )
        n = body.n if body.n is not None else defaults["n"]
        settings = Settings(
            sampler=body.sampler or defaults["sampler"],
            steps=steps,
            cfg_scale=body.cfg_scale if body.cfg_scale is not None else defaults["cfg_scale"],
            guided_channels=defaults["guided_channels"],
        )
        try:
            result = await _unless_disconnected(
                request, batcher.submit(class_id, n, body.seed, settings)
            )
        except PartsError as e:  # a damaged or missing tailor file: the server's data, not you
            raise HTTPException(500, str(e)) from None
        except Exception as e:  # the batch failed (the batcher logged the traceback)
            raise HTTPException(
                500, f"the batch failed: {type(e).__name__}: {e} (the server log has the details)"
            ) from None
        if result is None:  # nobody is left to answer; uvicorn drops what we send
            return Response(status_code=499)
        wants_npz = body.format == "npz" or (
            body.format is None and prefers_npz(request.headers.get("accept", ""))
        )
        headers = {
            "X-Kind-Batch": str(result.batch),
            "X-Kind-Batch-Samples": str(result.batch_samples),
            "X-Kind-Batch-Classes": str(result.batch_classes),
            "X-Kind-Seconds": f"{result.seconds:.3f}",
        }
        # encoding takes up to a second for 64 large images: off the event loop, which keeps
        # answering and batching meanwhile
        if wants_npz:
            content = await asyncio.to_thread(
                _npz, result, class_id, body.seed, settings, full.class_names
            )
            return Response(content, media_type=NPZ, headers=headers)
        content = await asyncio.to_thread(_png, result.images, min(n, 8))
        return Response(content, media_type="image/png", headers=headers)

    return app


def _field_problem(error: dict) -> str:
    """`field: what is wrong (got what it got)` for one pydantic error."""
    where = ".".join(str(p) for p in error["loc"] if p != "body") or "body"
    got = error.get("input")
    shown = f" (got {got!r:.80})" if isinstance(got, str | int | float) else ""
    return f"{where}: {error['msg']}{shown}"


def _body_problem(error: dict, content_type: str | None) -> str | None:
    """What is wrong with the body as a whole and how to send it, or None for one field's error:
    FastAPI reports a body that is not JSON (or not read as JSON) in pydantic's words, with a
    character offset where a field's name would be, and no fix."""
    kind, loc, got = error["type"], error["loc"], error.get("input")
    if kind == "json_invalid":  # loc: ("body", offset of the mistake)
        reason = error.get("ctx", {}).get("error", "JSON decode error")
        return f"the body is not valid JSON ({reason} at char {loc[-1]}); send {EXAMPLE}"
    if loc != ("body",):
        return None
    if kind == "missing":
        return f"the body is empty; send {EXAMPLE}"
    if isinstance(got, bytes):  # FastAPI parses JSON only when the Content-Type says so
        return (
            f"the body was not read as JSON (Content-Type: {content_type or 'none'}); "
            "send it with the header Content-Type: application/json"
        )
    if kind == "model_attributes_type":
        return f"the body must be a JSON object (got {json.dumps(got)[:60]}); send {EXAMPLE}"
    return None


async def _unless_disconnected(request: Request, work: Awaitable[Result]) -> Result | None:
    """`work`'s result, or None if the client disconnects first: then `work` is cancelled, so a
    request still queued is dropped rather than computed for nobody (`Batcher.submit`)."""
    job = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():
            job.cancel()
    if not job.done() or job.cancelled():
        log.info("a client disconnected before its images were drawn; dropped its request")
        return None
    return job.result()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects: the body is read, so the next ASGI message the
    server sends the app is `http.disconnect` (it comes only then, or never)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _png(images: torch.Tensor, columns: int) -> bytes:
    grid = io.BytesIO()
    image_grid(images, columns).save(grid, format="PNG")
    return grid.getvalue()


def _npz(result: Result, class_id: int, seed: int, settings: Settings, names: list[str]) -> bytes:
    """The images as `kind-dit sample` writes them (`kind.core.images.save_npz`), as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.npz"
        save_npz(path, result.images, [class_id] * len(result.images), names,
                 sampler=settings.sampler, steps=settings.steps, cfg_scale=settings.cfg_scale,
                 seed=seed)  # fmt: skip
        return path.read_bytes()
