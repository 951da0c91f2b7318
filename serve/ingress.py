"""The FastAPI ingress: validation, limits, authentication and timeouts in front of the deployments.

Everything a client can get wrong is checked here, before any model runs, and answered with a 4xx JSON
error naming the problem (`serve.api.ApiError`). The ingress itself holds no model and no tokens.
"""
# No `from __future__ import annotations` here: FastAPI reads the route signatures' annotations at run time,
# and Serve's class-based ingress cannot resolve them when they are strings.
import asyncio
import base64
import binascii
import hashlib
import hmac
import logging

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from factory.images import BadImage, load_rgb
from schemas import validate_concept_id
from serve.api import (
    ApiError, ClassifyRequest, ClassifyResponse, GairApiRequest, GairResponse, GenerateRequest, GenerateResponse,
    ReloadRequest, ReloadResponse, RetrieveRequest, RetrieveResponse, TokenDetail, TokensResponse,
)
from factory.gair import DEFAULT_ALPHAS, GairRequest
from factory.index.sharded import merge_hits, shard_of
from serve.guard import CHEAP, COSTLY, Admission, check_cost, read_allowed_image, unet_passes
from serve.studio import THUMBNAIL_CACHE, png_response, static_file, thumbnail_png
from serve.settings import Limits, ServeSettings, configure_batching

log = logging.getLogger("tokenfactory.serve")

app = FastAPI(title="tokenfactory", version="1",
              description="Classification, retrieval, generation and GAIR with learned concept tokens.")


class BodyLimit:
    """ASGI middleware: refuse request bodies over the limit (413) while they stream in, whether or not
    the client sent a Content-Length, so a huge upload is never buffered whole. Only /v1/classify takes
    images; every other route gets the small JSON limit, so a 2M-item list is refused before it is parsed."""

    limit = Limits().max_request_bytes  # set from the settings by the ingress replica that owns the app
    json_limit = Limits().max_json_bytes
    IMAGE_ROUTES = ("/v1/classify",)

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        limit = self.limit if scope.get("path") in self.IMAGE_ROUTES else self.json_limit
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _send_error(scope, send, ApiError(413, "request_too_large",
                                                    f"request body over the limit of {limit} bytes"))
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise ApiError(413, "request_too_large", f"request body over the limit of {limit} bytes")
            return message

        return await self.inner(scope, limited, send)


async def _send_error(scope, send, e: ApiError) -> None:
    response = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
    await response(scope, None, send)


app.add_middleware(BodyLimit)


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
    return JSONResponse(ApiError(500, "internal", f"internal error ({type(e).__name__}); see the server log").body(),
                        status_code=500)


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


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: dict, key_digest: str | None, text, image, index, generator, watcher,
                 admin_digest: str | None = None):
        from factory.backbones import resolve_backbone_config

        self.s = ServeSettings(**settings)
        self.limits = self.s.limits
        BodyLimit.limit, BodyLimit.json_limit = self.limits.max_request_bytes, self.limits.max_json_bytes
        self.key_digest, self.admin_digest = key_digest, admin_digest
        self.admission = Admission(self.limits)
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
            raise ApiError(504, "timeout", f"no answer within {timeout or self.limits.timeout_s:g}s; retry later") from None
        except asyncio.CancelledError:  # the client went away
            response.cancel()
            raise

    def _authorise(self, request: Request, admin: bool) -> str:
        """Check the key the route needs; returns who is asking (for rate limits): a key digest or an address."""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        digest = hashlib.sha256(key.strip().encode()).hexdigest() if scheme.lower() == "bearer" and key else None
        needed = self.admin_digest if admin else (self.key_digest if self.s.require_key else None)
        if admin and needed is None:
            raise ApiError(403, "admin_disabled", "the admin API is off: start the service with --admin-key-env")
        if needed is not None:
            if digest is None:
                raise ApiError(401, "unauthorized", "send the API key as 'Authorization: Bearer <key>'")
            if not hmac.compare_digest(digest, needed):  # constant time: no timing oracle on the key
                raise ApiError(401, "unauthorized", "wrong API key")
            return "key:" + digest[:16]
        return "addr:" + (request.client.host if request.client else "?")

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
        return await asyncio.to_thread(read_allowed_image, uri, self.s.image_uri_prefixes, self.s3,
                                       self.limits.max_request_bytes)

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
            version, text_v, index_n, _ = await asyncio.wait_for(asyncio.gather(
                self.watcher.current.remote(), self.text.ready.remote(), self._gallery_items(),
                self.image.ready.remote()), 10.0)
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

    @app.post("/v1/classify", response_model=ClassifyResponse)
    async def classify(self, body: ClassifyRequest, request: Request):
        who = self._authorise(request, admin=False)
        _check_range("top_k", body.top_k, 1, self.limits.max_top_k)
        with self.admission.admit(who, CHEAP):
            pixels = await self._image(body)
            out = _raise_if_error(await self._classify_batch((pixels, body.parent, body.top_k)))
        return {"concepts": [{"concept_id": c, "parent": p, "score": s} for c, p, s in out["concepts"]],
                "registry_version": out["registry_version"]}

    @app.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(self, body: RetrieveRequest, request: Request):
        who = self._authorise(request, admin=False)
        _check_text("query", body.query, self.limits.max_prompt_chars)
        _check_range("top_k", body.top_k, 1, self.limits.max_top_k)
        with self.admission.admit(who, CHEAP):
            out = _raise_if_error(await self._retrieve_batch((body.query, body.top_k)))
        return {"items": [{"id": i, "uri": u, "score": s} for i, u, s in out["items"]],
                "registry_version": out["registry_version"]}

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, body: GenerateRequest, request: Request):
        who = self._authorise(request, admin=False)
        _check_text("prompt", body.prompt, self.limits.max_prompt_chars)
        _check_range("n", body.n, 1, self.limits.max_images)
        _check_range("steps", body.steps, 1, self.limits.max_steps)
        check_cost(unet_passes(body.n, body.steps, float(body.guidance)), self.limits)
        with self.admission.admit(who, COSTLY):
            return await self._call(self.generator.generate.remote(body.prompt, body.n, body.seed, body.steps,
                                                                   float(body.guidance)), self.limits.generation_timeout_s)

    @app.post("/v1/gair", response_model=GairResponse)
    async def gair(self, body: GairApiRequest, request: Request):
        who = self._authorise(request, admin=False)
        lim = self.limits
        _check_text("intent", body.intent, lim.max_prompt_chars)
        _check_range("top_k", body.top_k, 1, lim.max_top_k)
        _check_range("previews", body.previews, 1, lim.max_previews)
        _check_range("steps", body.steps, 1, lim.max_steps)
        _check_range("number of concept_ids", len(body.concept_ids), 1, lim.max_concepts)
        if body.alphas is not None:
            _check_range("number of alphas", len(body.alphas), 1, lim.max_alphas)
            for a in body.alphas:
                _check_range("each alpha", a, 0.0, 1.0)
        if body.mode == "manual" and body.alpha is None:
            raise ApiError(422, "invalid_request", "manual mode needs alpha")
        # Rendered α: the chosen one only, or every α searched (the schedule and two per bisection round).
        searched = 1 if body.mode == "manual" else len(body.alphas or DEFAULT_ALPHAS) + 2 * body.refine
        n_alphas = 1 if body.previews_for == "chosen" else searched
        check_cost(unet_passes(body.previews * n_alphas, body.steps, GairRequest.guidance), lim)
        req = body.model_dump(exclude_none=True)
        with self.admission.admit(who, COSTLY):
            return await self._call(self.generator.gair.remote(req), lim.generation_timeout_s)

    @app.get("/v1/tokens", response_model=TokensResponse)
    async def tokens(self, request: Request):
        with self.admission.admit(self._authorise(request, admin=False), CHEAP):
            return await self._call(self.text.tokens.remote())

    @app.get("/v1/tokens/{concept_id}", response_model=TokenDetail)
    async def token(self, concept_id: str, request: Request):
        who = self._authorise(request, admin=False)
        _check_concept_id(concept_id)
        with self.admission.admit(who, CHEAP):
            return await self._call(self.text.token.remote(concept_id))

    @app.get("/v1/tokens/{concept_id}/thumbnails/{k}", responses={200: {"content": {"image/png": {}}}})
    async def token_thumbnail(self, concept_id: str, k: int, request: Request):
        """A reference thumbnail of a concept, stored with its token at onboarding."""
        who = self._authorise(request, admin=False)
        _check_concept_id(concept_id)
        with self.admission.admit(who, CHEAP):
            out = await self._call(self.text.thumbnail.remote(concept_id, k))
        return png_response(base64.b64decode(out["png"]))

    @app.get("/v1/items/{item_id}/thumbnail", responses={200: {"content": {"image/png": {}}}})
    async def item_thumbnail(self, item_id: str, request: Request):
        """A small PNG of a gallery item, read from the URI the index stores for it (never a client's URI),
        size-bounded and cached."""
        who = self._authorise(request, admin=False)
        if len(item_id) > 256:
            raise ApiError(422, "bad_item_id", "item id over 256 characters")
        with self.admission.admit(who, CHEAP):
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
            self._authorise(request, admin=False)
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
    async def reload(self, request: Request, body: ReloadRequest | None = None):
        self._authorise(request, admin=True)
        out = await self._call(self.watcher.reload.remote(body.version if body else None))
        await asyncio.sleep(self.s.version_check_s)  # every replica's cached version has now expired
        return out
