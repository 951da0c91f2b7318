"""The FastAPI ingress: validation, limits, authentication and timeouts in front of the deployments.

Everything a client can get wrong is checked here, before any model runs, and answered with a 4xx JSON
error naming the problem (`serve.api.ApiError`). The ingress itself holds no model and no tokens.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run time,
# and Serve's class-based ingress cannot resolve them when they are strings.
import asyncio
import base64
import binascii
import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from factory.images import BadImage, load_rgb
from factory.index.sharded import merge_hits, shard_of
from schemas import validate_concept_id
from serve.api import (
    ApiError,
    ClassifyRequest,
    ClassifyResponse,
    GairApiRequest,
    GairResponse,
    GenerateRequest,
    GenerateResponse,
    ReloadRequest,
    ReloadResponse,
    RetrieveRequest,
    RetrieveResponse,
    TokenDetail,
    TokensResponse,
)
from serve.edge import CLIENT, EdgeGuard, EdgePolicy
from serve.guard import check_cost, read_allowed_image, unet_passes
from serve.settings import ServeSettings, configure_batching
from serve.studio import THUMBNAIL_CACHE, png_response, static_file, thumbnail_png

log = logging.getLogger("tokenfactory.serve")

# No Swagger UI or ReDoc: FastAPI's load their scripts from a CDN (unpinned, no integrity check) onto the
# studio's origin, where they could read the key the studio keeps; `docs: true` serves a script-free page
# instead (`serve.edge`). The OpenAPI document itself stays at /openapi.json.
app = FastAPI(
    title="tokenfactory",
    version="1",
    docs_url=None,
    redoc_url=None,
    description="Classification, retrieval, generation and GAIR with learned concept tokens.",
)


# The edge (serve/edge.py): host allow-list, per-address cap, key and admission from the headers, then the
# body under a size limit and a deadline, before FastAPI reads anything; browser hardening headers on every
# response. Added last, so it runs first (inside only Starlette's error middleware).
app.add_middleware(EdgeGuard)


@app.exception_handler(ApiError)
async def _api_error(_: Request, e: ApiError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError):
    problems = []
    for err in e.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse(ApiError(422, "invalid_request", "; ".join(problems)).body(), status_code=422)


@app.exception_handler(Exception)
async def _unexpected(_: Request, e: Exception):
    log.exception("unexpected error")
    return JSONResponse(
        ApiError(500, "internal", f"internal error ({type(e).__name__}); see the server log").body(), status_code=500
    )


@app.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, e: StarletteHTTPException):
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(ApiError(e.status_code, code, str(e.detail)).body(), status_code=e.status_code)


def _check_range(name: str, value: int | float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise ApiError(422, "out_of_range", f"{name} must be between {low:g} and {high:g}, got {value}")


def _check_text(name: str, text: str, limit: int) -> None:
    if len(text) > limit:
        raise ApiError(422, "prompt_too_long", f"{name} has {len(text)} characters; the limit is {limit}")
    if "\x00" in text:
        raise ApiError(422, "bad_prompt", f"{name} contains a NUL character")


def _check_concept_id(concept_id: str) -> None:
    try:
        validate_concept_id(concept_id)
    except ValueError as e:
        raise ApiError(422, "bad_concept_id", str(e)) from None


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "bad_base64", "image is not valid base64") from None


def _raise_if_error(result: dict) -> dict:
    if isinstance(result, dict) and "error" in result:
        e = result["error"]
        raise ApiError(e["status"], e["code"], e["message"])
    return result


# /v1/classify's body in the OpenAPI document, as FastAPI would write it from a `ClassifyRequest` parameter.
CLASSIFY_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": ClassifyRequest.model_json_schema()}}}
}
# A classify body is one object of strings and numbers: a few braces and brackets at most. Thousands of
# them are a body built to cost parsing time (2.8M empty lists: 3 CPU-s), refused after a byte count.
MAX_JSON_CONTAINERS = 64


async def parse_off_loop(model, request: Request):
    """``model`` from the request's JSON body, parsed and validated in a worker thread; the same 422s as a
    body parameter (`RequestValidationError`, or an `ApiError` a validator raises)."""
    content_type = request.headers.get("content-type", "")
    raw = await request.body()  # already read, with its size limit and deadline, by the edge
    if content_type and "json" not in content_type.split(";")[0].lower():
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "send the body as application/json", "type": "model_attributes_type"}]
        )
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_CONTAINERS:
        raise ApiError(422, "invalid_request", f"body: more than {MAX_JSON_CONTAINERS} JSON objects and lists")
    try:
        # In a worker thread pydantic-core lets the loop run meanwhile (measured on 8 MiB of nested lists: 3 s
        # of parsing, the loop's longest pause 46 ms; `json.loads` on the loop stalled it for 0.6 s).
        return await asyncio.to_thread(model.model_validate_json, raw)
    except ValidationError as e:
        raise RequestValidationError([{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()]) from None


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        settings: dict,
        key_digest: str | None,
        text,
        image,
        index,
        generator,
        watcher,
        admin_digest: str | None = None,
    ):
        from factory.backbones import resolve_backbone_config

        self.s = ServeSettings(**settings)
        self.limits = self.s.limits
        # Keys and admission are checked at the edge, before a body is read; the routes only validate.
        self.edge = EdgeGuard.policy = EdgePolicy(self.s, key_digest, admin_digest)
        self._thumbs: dict[str, bytes] = {}
        self.text, self.image, self.generator, self.watcher = text, image, generator, watcher
        self.shards = list(index) if isinstance(index, (list, tuple)) else [index]  # GalleryIndex handle(s)
        self.s3 = self.s.s3()  # read once: image_uri and thumbnail reads are on the request path
        self.image_size = resolve_backbone_config(self.s.backbone, self.s.weights, self.s3).image.size
        configure_batching(self.s, self._classify_batch, self._retrieve_batch)

    # --- plumbing -------------------------------------------------------------------------------------
    async def _call(self, response, timeout: float | None = None):
        try:
            return _raise_if_error(await asyncio.wait_for(response, timeout or self.limits.timeout_s))
        except asyncio.TimeoutError:
            response.cancel()  # the replica's work stops too (sampling polls for it between steps)
            raise ApiError(
                504, "timeout", f"no answer within {timeout or self.limits.timeout_s:g}s; retry later"
            ) from None
        except asyncio.CancelledError:  # the client went away
            response.cancel()
            raise

    async def _image(self, req: ClassifyRequest) -> np.ndarray:
        if req.image is not None:
            if len(req.image) > self.limits.max_request_bytes:
                raise ApiError(413, "request_too_large", "image over the request size limit")
            data = await asyncio.to_thread(_b64decode, req.image)
        else:
            data = await self._read_uri(req.image_uri)
        try:  # decoding a large PNG takes CPU-seconds: never on the event loop, which serves every route
            return await asyncio.to_thread(load_rgb, data, self.image_size, max_pixels=self.limits.max_image_pixels)
        except BadImage as e:
            status = 413 if str(e).startswith("too large") else 422
            raise ApiError(status, "bad_image", f"image: {e}") from None

    async def _read_uri(self, uri: str) -> bytes:
        return await asyncio.to_thread(
            read_allowed_image, uri, self.s.image_uri_prefixes, self.s3, self.limits.max_request_bytes
        )

    async def _gallery_items(self) -> int:
        return sum(await asyncio.gather(*(shard.ready.remote() for shard in self.shards)))

    async def _gallery_search(self, queries: np.ndarray, ks: list[int]) -> list:
        """Every shard's hits for the queries, merged: the global top k of a query is among the shards' top k."""
        parts = await asyncio.gather(*(self._call(shard.search.remote((queries, ks))) for shard in self.shards))
        return parts[0] if len(parts) == 1 else merge_hits(parts, ks)

    # --- routes ---------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:
            version, text_v, index_n, _ = await asyncio.wait_for(
                asyncio.gather(
                    self.watcher.current.remote(),
                    self.text.ready.remote(),
                    self._gallery_items(),
                    self.image.ready.remote(),
                ),
                10.0,
            )
        except Exception as e:  # the details go to the log, not to whoever asks
            log.warning("not ready: %s: %s", type(e).__name__, e)
            return JSONResponse({"ready": False, "reason": "starting or degraded; see the server log"}, status_code=503)
        return {"ready": True, "registry_version": version, "gallery_items": index_n}

    # Concurrent classify and retrieve requests are batched here, at the ingress, and not only in the
    # deployments behind it: each hop between replicas costs a few milliseconds of CPU on both sides,
    # about as much as the model itself, so a batch makes one call per hop instead of one per request.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, items: list[tuple[np.ndarray, str | None, int]]) -> list[dict]:
        pixels, parents, top_ks = zip(*items)
        features = await self._call(self.image.encode.remote(np.stack(pixels)))
        return await self._call(self.text.classify.remote(features, list(parents), list(top_ks)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _retrieve_batch(self, items: list[tuple[str, int]]) -> list[dict]:
        out = await self._call(self.text.encode.remote([q for q, _ in items]))  # per query: features or error
        good = [i for i, e in enumerate(out) if "error" not in e]
        if good:
            queries = np.stack([out[i]["features"] for i in good])
            hits = await self._gallery_search(queries, [items[i][1] for i in good])
            for i, h in zip(good, hits):
                out[i] = {"items": h, "registry_version": out[i]["registry_version"]}
        return out

    # The body is read as bytes and parsed in a worker thread: FastAPI would parse up to 8 MiB of JSON on the
    # event loop, which serves every route (audit N2). The key was checked at the edge before it was read.
    @app.post("/v1/classify", response_model=ClassifyResponse, openapi_extra=CLASSIFY_BODY)
    async def classify(self, request: Request):
        body = await parse_off_loop(ClassifyRequest, request)
        _check_range("top_k", body.top_k, 1, self.limits.max_top_k)
        pixels = await self._image(body)
        out = _raise_if_error(await self._classify_batch((pixels, body.parent, body.top_k)))
        return {
            "concepts": [{"concept_id": c, "parent": p, "score": s} for c, p, s in out["concepts"]],
            "registry_version": out["registry_version"],
        }

    @app.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(self, body: RetrieveRequest):
        _check_text("query", body.query, self.limits.max_prompt_chars)
        _check_range("top_k", body.top_k, 1, self.limits.max_top_k)
        out = _raise_if_error(await self._retrieve_batch((body.query, body.top_k)))
        return {
            "items": [{"id": i, "uri": u, "score": s} for i, u, s in out["items"]],
            "registry_version": out["registry_version"],
        }

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest):
        _check_text("prompt", body.prompt, self.limits.max_prompt_chars)
        _check_range("n", body.n, 1, self.limits.max_images)
        _check_range("steps", body.steps, 1, self.limits.max_steps)
        check_cost(unet_passes(body.n, body.steps, float(body.guidance)), self.limits)
        return await self._call(
            self.generator.generate.remote(body.prompt, body.n, body.seed, body.steps, float(body.guidance)),
            self.limits.generation_timeout_s,
        )

    @app.post("/v1/gair", response_model=GairResponse)
    async def gair(self, body: GairApiRequest):
        """The body was checked as the method's own request on parsing (`serve.api.GairApiRequest`); here only
        this deployment's limits, and the price the request states (`GairRequest.unet_passes`)."""
        lim = self.limits
        _check_text("intent", body.intent, lim.max_prompt_chars)
        _check_range("top_k", body.top_k, 1, lim.max_top_k)
        _check_range("previews", body.previews, 1, lim.max_previews)
        _check_range("steps", body.steps, 1, lim.max_steps)
        _check_range("number of concept_ids", len(body.concept_ids), 1, lim.max_concepts)
        _check_range("number of alphas", len(body.alphas), 1, lim.max_alphas)
        check_cost(body.unet_passes(), lim)
        out = await self._call(self.generator.gair.remote(body), lim.generation_timeout_s)
        # Already the JSON of `GairResponse` (`Generator.gair` dumps the method's result once): sent as it is,
        # since response_model validation would want the in-memory result (pixels, not PNG files) back.
        return JSONResponse(out)

    @app.get("/v1/tokens", response_model=TokensResponse)
    async def tokens(self):
        return await self._call(self.text.tokens.remote())

    @app.get("/v1/tokens/{concept_id}", response_model=TokenDetail)
    async def token(self, concept_id: str):
        _check_concept_id(concept_id)
        return await self._call(self.text.token.remote(concept_id))

    @app.get("/v1/tokens/{concept_id}/thumbnails/{k}", responses={200: {"content": {"image/png": {}}}})
    async def token_thumbnail(self, concept_id: str, k: int):
        """A reference thumbnail of a concept, stored with its token at onboarding."""
        _check_concept_id(concept_id)
        out = await self._call(self.text.thumbnail.remote(concept_id, k))
        return png_response(base64.b64decode(out["png"]))

    @app.get("/v1/items/{item_id}/thumbnail", responses={200: {"content": {"image/png": {}}}})
    async def item_thumbnail(self, item_id: str):
        """A small PNG of a gallery item, read from the URI the index stores for it (never a client's URI),
        size-bounded and cached."""
        if len(item_id) > 256:
            raise ApiError(422, "bad_item_id", "item id over 256 characters")
        png = self._thumbs.get(item_id)
        if png is None:
            shard = self.shards[shard_of(item_id, len(self.shards))]  # the one shard that can hold it
            uri = (await self._call(shard.uri_of.remote(item_id)))["uri"]
            png = await asyncio.to_thread(thumbnail_png, uri, self.s3, self.limits)
            self._thumbs[item_id] = png
            while len(self._thumbs) > THUMBNAIL_CACHE:
                self._thumbs.pop(next(iter(self._thumbs)))
        return png_response(png)

    @app.get("/v1/auth")
    async def auth(self, request: Request) -> dict:
        """Whether /v1 routes need a key, and whether the one sent (if any) is right: lets the studio ask for
        a key before calling anything, instead of learning it from a 401."""
        try:
            self.edge.authorise(request.headers.get("authorization", ""), "", CLIENT)
            valid = True
        except ApiError:
            valid = False
        return {"key_required": self.s.require_key, "key_valid": valid}

    @app.get("/", include_in_schema=False)
    async def root(self):
        return RedirectResponse("studio")

    @app.get("/studio", include_in_schema=False)
    async def studio(self):
        return static_file("studio.html")

    @app.get("/studio/{name}", include_in_schema=False)
    async def studio_file(self, name: str):
        return static_file(name)

    @app.post("/v1/admin/reload", response_model=ReloadResponse)
    async def reload(self, body: ReloadRequest | None = None):  # the admin key was checked at the edge
        out = await self._call(self.watcher.reload.remote(body.version if body else None))
        await asyncio.sleep(self.s.version_check_s)  # every replica's cached version has now expired
        return out
