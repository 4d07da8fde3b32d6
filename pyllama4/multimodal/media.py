"""A user's image reference (URL, data URL, file, base64) to a decoded PIL image.

Invariant: `load_image` either returns a fully loaded image (no open file handle) in the mode it
was encoded in, or raises `MediaError` whose text is a short message fit for a 400 response. On
the way it never reads more than `max_bytes` of encoded data from any source, never decodes an
image over `max_pixels` (checked from the header, before the pixels are decoded), never reads a
local file whose real path lies outside `allowed_local_path`, never fetches when fetching is
off or from a host or address the policy refuses, and never decodes base64 or pixels or reads a
file on the event loop.

Sources:
  - `data:image/<format>;base64,<data>`: base64 is required;
  - `http://` / `https://`: fetched under the policy's host and address rules, which every
    redirect must also pass (pyllama4.multimodal.fetch, which also says what a client is told
    when a fetch fails);
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
from PIL import Image

from pyllama4.multimodal.addresses import DEFAULT_NETWORKS, Networks
from pyllama4.multimodal.fetch import BodyTooLarge, FetchError, FetchPolicy, fetch, short

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

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
    fetch_timeout: float = 10.0  # seconds for the whole fetch (every hop: resolve, connect, body)
    allowed_domains: frozenset[str] | None = None  # --allowed-media-domains; None: any host
    fetch_networks: Networks = DEFAULT_NETWORKS  # --image-fetch-networks: addresses fetched from
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


def _reason(e: Exception) -> str:
    return short(str(e) or type(e).__name__, 200)


def _too_large(max_bytes: int) -> MediaError:
    return MediaError(f"the image is larger than this server's limit of {max_bytes} bytes")


async def _fetch(url: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_fetch:
        raise MediaError(
            "remote image URLs are disabled on this server (--disable-image-url-fetch); "
            "send the image inline as a data:image/<format>;base64,... URL"
        )
    rules = FetchPolicy(
        timeout=policy.fetch_timeout,
        max_bytes=policy.max_bytes,
        allowed_domains=policy.allowed_domains,
        networks=policy.fetch_networks,
    )
    try:
        return await fetch(url, rules)
    except BodyTooLarge:
        raise _too_large(policy.max_bytes) from None
    except FetchError as e:
        raise MediaError(str(e)) from None


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
        raise MediaError(f"unsupported image source {short(source)!r}: expected {_SOURCES}")
    if len(source) > _PATH_MAX or (len(source) % 4 == 0 and _BASE64.fullmatch(source)):
        return _from_base64(source, policy.max_bytes)
    return _read_file(source, policy)


def _from_data_url(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url[len("data:") :].partition(",")
    if not comma:
        raise MediaError("malformed data URL: expected data:image/<format>;base64,<data>")
    media_type, *params = (p.strip().lower() for p in header.split(";"))
    if not media_type.startswith("image/"):
        raise MediaError(f"data URL media type must be image/*, got {short(media_type, 60)!r}")
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
            raise MediaError(f"{short(path)} is not a regular file")
        with open(real, "rb") as f:
            data = f.read(policy.max_bytes + 1)
    except OSError as e:
        raise MediaError(
            f"cannot read the image file {short(path)}: {e.strerror or type(e).__name__}"
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
