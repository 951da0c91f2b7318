"""What the GAIR studio page needs beyond the /v1 API: its static files and gallery thumbnails.

The page itself is `serve/static/` (HTML, CSS and JavaScript shipped in the package: no CDN, no build
step). Thumbnails of gallery items are read only from the URIs the gallery index stores (never a URI a
client sends), at most the request size limit, and cached per ingress replica.
"""

from __future__ import annotations

from fastapi.responses import Response

from factory.images import BadImage
from serve.api import ApiError
from serve.settings import Limits

THUMBNAIL_CACHE = 1024  # gallery thumbnails kept per ingress replica (a few KB each)
STATIC = {"studio.html": "text/html", "studio.js": "text/javascript", "studio.css": "text/css"}


def static_file(name: str):
    """The studio's files, shipped in the package (no CDN, no build step); nothing else is served."""
    from importlib.resources import files

    if name not in STATIC:
        raise ApiError(404, "not_found", f"no studio file {name!r}")
    body = (files("serve") / "static" / name).read_bytes()
    return Response(body, media_type=STATIC[name], headers={"Cache-Control": "no-cache"})


def png_response(png: bytes):
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def thumbnail_png(uri: str, s3, limits: Limits) -> bytes:
    import base64 as b64

    from factory import storage
    from factory.images import decode_image, thumbnail_b64

    try:
        data = storage.read_bytes(uri, s3, limits.max_request_bytes + 1)
    except FileNotFoundError:
        raise ApiError(404, "image_unavailable", "the gallery item's image is gone") from None
    except storage.StorageError:
        raise ApiError(503, "store_unavailable", "the image store is unreachable; retry later") from None
    if len(data) > limits.max_request_bytes:
        raise ApiError(413, "image_too_large", "the gallery item's image is over the size limit")
    try:
        image = decode_image(data, limits.max_image_pixels)
    except BadImage as e:
        raise ApiError(422, "bad_image", f"the gallery item's image: {e}") from None
    return b64.b64decode(thumbnail_b64(image, px=128))
