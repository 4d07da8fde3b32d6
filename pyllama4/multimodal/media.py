"""A user's image reference (URL, data URL, file, base64) to a decoded PIL image.

Invariant: `load_image` either returns a fully loaded image (no open file handle) in the mode it
was encoded in, or raises `MediaError` whose text is a short message fit for a 400 response. On
the way it never reads more than `max_bytes` of encoded data from any source, never decodes an
image over `max_pixels` (checked from the header, before the pixels are decoded), never reads a
local file whose real path lies outside `allowed_local_path`, never fetches when fetching is
off, and never decodes base64 or pixels or reads a file on the event loop.

Sources:
  - `data:image/<format>;base64,<data>`: base64 is required;
  - `http://` / `https://`: fetched (at most 5 redirects, each to http(s));
  - `file://` URLs;
  - a string that is valid base64 (only base64 characters, length a multiple of 4): base64 image
    data (SGLang's `image_data`);
  - anything else without a URL scheme: a filesystem path. A path that happens to be valid base64
    (no `.` and a length a multiple of 4, e.g. `/srv/img/cat`) reads as base64: name such a file
    by a file:// URL.
Decoded formats: PNG, JPEG, WEBP, GIF (its first frame) and BMP; other formats are refused.
PIL's own decompression-bomb guard stays in force as an outer cap (an error above
2 * Image.MAX_IMAGE_PIXELS); its warnings are left alone, because warning filters are
process-global and not thread-safe.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import anyio
import anyio.to_thread
import httpx
from PIL import Image

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_REDIRECTS = 5

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")
_BASE64 = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_PATH_MAX = 4096  # Linux's: no longer string is a path
_SOURCES = (
    "an http(s):// URL, a data:image/<format>;base64,<data> URL, a file:// URL or file path "
    "(with --allowed-local-media-path), or base64 image data"
)


class MediaError(ValueError):
    """The image cannot be used; str(e) is a clear message for a 400 response."""


@dataclass(frozen=True)
class MediaPolicy:
    allow_fetch: bool = True  # False: --disable-image-url-fetch (http/https refused)
    fetch_timeout: float = 10.0  # seconds for the whole fetch (connect + body)
    max_bytes: int = 20 * 2**20  # encoded size limit for any source
    allowed_local_path: Path | None = None  # None: file:// and paths refused
    max_pixels: int = 40_000_000  # width*height limit, checked from the header before decoding


async def load_image(source: str, policy: MediaPolicy) -> Image.Image:
    """The image `source` refers to, decoded and loaded; MediaError when it cannot be used."""
    source = source.strip()
    match = _SCHEME.match(source)
    if match is not None and match[1].lower() in ("http", "https"):
        data = await _fetch(source, policy)
    else:
        data = await anyio.to_thread.run_sync(_read_inline_or_local, source, policy)
    return await anyio.to_thread.run_sync(_decode, data, policy.max_pixels)


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reason(e: Exception) -> str:
    return _short(str(e) or type(e).__name__, 200)


def _too_large(max_bytes: int) -> MediaError:
    return MediaError(f"the image is larger than this server's limit of {max_bytes} bytes")


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_fetch:
        raise MediaError(
            "remote image URLs are disabled on this server (--disable-image-url-fetch); "
            "send the image inline as a data:image/<format>;base64,... URL"
        )
    shown = _short(url)
    try:
        with anyio.fail_after(policy.fetch_timeout):
            # Accept-Encoding identity: Content-Length and the streamed byte count are then the
            # image's own size, and no compressed body can inflate past the limit in one chunk.
            headers = {"User-Agent": "pyllama4", "Accept-Encoding": "identity"}
            async with httpx.AsyncClient(headers=headers, timeout=None) as client:
                target = httpx.URL(url)
                for _ in range(MAX_REDIRECTS + 1):
                    async with client.stream("GET", target) as response:
                        if not response.is_redirect:
                            return await _read_body(response, policy.max_bytes)
                        location = response.headers["location"]
                        target = response.url.join(location)
                        if target.scheme not in ("http", "https"):
                            raise MediaError(
                                f"the image URL {shown} redirected to a non-HTTP URL: "
                                f"{_short(location)}"
                            )
                raise MediaError(
                    f"the image URL {shown} redirected more than {MAX_REDIRECTS} times"
                )
    except TimeoutError:
        raise MediaError(
            f"fetching the image from {shown} timed out after {policy.fetch_timeout:g} s"
        ) from None
    except (httpx.HTTPError, httpx.InvalidURL) as e:
        raise MediaError(f"could not fetch the image from {shown}: {_reason(e)}") from None


async def _read_body(response: httpx.Response, max_bytes: int) -> bytes:
    shown = _short(str(response.url))
    if not response.is_success:
        raise MediaError(f"fetching the image from {shown} failed: HTTP {response.status_code}")
    content_type = response.headers.get("content-type", "")
    if not content_type.split(";")[0].strip().lower().startswith("image/"):
        received = _short(content_type, 60) or "none"
        raise MediaError(f"{shown} is not an image (Content-Type: {received})")
    length = response.headers.get("content-length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    return bytes(body)


def _read_inline_or_local(source: str, policy: MediaPolicy) -> bytes:
    """The encoded bytes of any source but http(s); runs in a worker thread."""
    match = _SCHEME.match(source)
    scheme = None if match is None else match[1].lower()
    if scheme == "data":
        return _from_data_url(source, policy.max_bytes)
    if scheme == "file":
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise MediaError("file:// URLs must name a local file (file:///path/to/image)")
        return _read_file(unquote(parts.path), policy)
    if scheme is not None:
        raise MediaError(f"unsupported image source {_short(source)!r}: expected {_SOURCES}")
    if len(source) > _PATH_MAX or (len(source) % 4 == 0 and _BASE64.fullmatch(source)):
        return _from_base64(source, policy.max_bytes)
    return _read_file(source, policy)


def _from_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError("malformed data URL: expected data:image/<format>;base64,<data>")
    media_type, *params = (p.strip().lower() for p in header.split(";"))
    if not media_type.startswith("image/"):
        raise MediaError(f"data URL media type must be image/*, got {_short(media_type, 60)!r}")
    if "base64" not in params:
        raise MediaError("data URLs must be base64-encoded: data:image/<format>;base64,<data>")
    return _from_base64(payload, max_bytes)


def _from_base64(text: str, max_bytes: int) -> bytes:
    if (len(text) - text.count("=", -2)) * 3 // 4 > max_bytes:  # the decoded size, if valid
        raise _too_large(max_bytes)
    if not _BASE64.fullmatch(text):
        raise MediaError("the image data is not valid base64")
    try:
        return base64.b64decode(text)
    except binascii.Error as e:
        raise MediaError(f"the image data is not valid base64 ({e})") from None


def _read_file(path: str, policy: MediaPolicy) -> bytes:
    root = policy.allowed_local_path
    if root is None:
        raise MediaError(
            "local image files are disabled on this server; start it with "
            "--allowed-local-media-path DIR to allow files under DIR"
        )
    real = Path(path).resolve()
    if not real.is_relative_to(root.resolve()):
        raise MediaError(
            "the image path is outside the directory allowed by --allowed-local-media-path"
        )
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise MediaError(f"{_short(path)} is not a regular file")
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(
            f"cannot read the image file {_short(path)}: {e.strerror or type(e).__name__}"
        ) from None
    if len(data) > policy.max_bytes:
        raise _too_large(policy.max_bytes)
    return data


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    """The loaded image in `data`; runs in a worker thread."""
    if not data:
        raise MediaError("the image data is empty")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise MediaError(
                f"the image has too many pixels: {width}x{height} is over this server's limit "
                f"of {max_pixels}"
            )
        image.load()  # the first frame of an animated image
    except MediaError:
        raise
    except Image.DecompressionBombError:
        raise MediaError("the image has too many pixels to decode safely") from None
    except Image.UnidentifiedImageError:
        raise MediaError(_unrecognized(data)) from None
    except Exception as e:  # PIL raises many types on corrupt data; each is the client's error
        raise MediaError(f"could not decode the image: {_reason(e)}") from None
    return image


def _unrecognized(data: bytes) -> str:
    """Why no accepted format reads `data`: the format's name when PIL knows it anyway."""
    accepted = ", ".join(FORMATS)
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only, never decoded
            return f"unsupported image format {image.format} (accepted: {accepted})"
    except Exception:
        return f"could not decode the image: not a valid image in an accepted format ({accepted})"
