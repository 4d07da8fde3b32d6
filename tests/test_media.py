"""pyllama4.multimodal.media.load_image: every accepted source decodes to the right pixels; every
refused or broken one raises a MediaError whose message says why (and names the server flag to
change where there is one).

HTTP sources are in test_media_fetch.py.
"""

from __future__ import annotations

import base64
import io
import os
import random
import struct
import zlib
from pathlib import Path

import anyio
import pytest
from PIL import Image

from pyllama4.multimodal.media import MediaError, MediaPolicy, load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def pattern() -> Image.Image:
    """3x2 RGB, every pixel different."""
    image = Image.new("RGB", (3, 2))
    image.putdata([RED, BLUE, (0, 255, 0), (1, 2, 3), (200, 100, 50), (255, 255, 255)])
    return image


def is_pattern(image: Image.Image) -> bool:
    return image.size == (3, 2) and image.convert("RGB").tobytes() == pattern().tobytes()


def noise(size: int = 64) -> Image.Image:
    rng = random.Random(0)
    return Image.frombytes(
        "RGB", (size, size), bytes(rng.randrange(256) for _ in range(3 * size**2))
    )


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height (1-bit gray) but holds no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def load(source: str, policy: MediaPolicy | None = None) -> Image.Image:
    return anyio.run(load_image, source, policy or MediaPolicy())


def error(source: str, policy: MediaPolicy | None = None) -> str:
    with pytest.raises(MediaError) as e:
        load(source, policy)
    return str(e.value)


PNG = encode(pattern(), "PNG")
JPEG = encode(Image.new("RGB", (16, 8), RED), "JPEG", quality=95)


# ---- data URLs and bare base64 -------------------------------------------------------------


def test_png_data_url_keeps_pixels_and_mode():
    image = load(data_url(PNG))
    assert image.format == "PNG" and image.mode == "RGB"
    assert is_pattern(image)
    rgba = load(data_url(encode(Image.new("RGBA", (2, 2), (1, 2, 3, 4)), "PNG")))
    assert rgba.mode == "RGBA" and rgba.getpixel((1, 1)) == (1, 2, 3, 4)


def test_jpeg_data_url():
    image = load(data_url(JPEG, "image/jpeg"))
    assert image.format == "JPEG" and image.size == (16, 8)
    assert all(abs(a - b) <= 3 for a, b in zip(image.getpixel((4, 4)), RED, strict=True))


def test_webp_data_url():
    image = load(data_url(encode(pattern(), "WEBP", lossless=True), "image/webp"))
    assert image.format == "WEBP"
    assert is_pattern(image)


def test_bmp_data_url():
    image = load(data_url(encode(pattern(), "BMP"), "image/bmp"))
    assert image.format == "BMP" and is_pattern(image)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 2
    image = load(data_url(gif, "image/gif"))
    assert image.format == "GIF" and image.tell() == 0
    assert image.convert("RGB").getpixel((2, 2)) == RED


def test_declared_data_url_subtype_does_not_matter():
    assert load(data_url(PNG, "image/jpeg")).format == "PNG"


def test_bare_base64():
    image = load(base64.b64encode(PNG).decode())
    assert is_pattern(image)
    assert load(base64.b64encode(JPEG).decode()).format == "JPEG"  # starts with "/9j/"


def test_data_url_must_be_base64_image():
    assert "base64" in error("data:image/png," + PNG.hex())
    assert "image/*" in error("data:text/plain;base64," + base64.b64encode(PNG).decode())
    assert "malformed data URL" in error("data:image/png;base64")
    assert "not valid base64" in error("data:image/png;base64,@@@@")
    assert "not valid base64" in error("data:image/png;base64,iVBORw0KGgo")  # bad padding


def test_empty_data():
    assert "empty" in error("data:image/png;base64,")
    assert "empty" in error("")


def test_oversized_base64_is_refused_before_decoding():
    policy = MediaPolicy(max_bytes=1000)
    assert "limit of 1000 bytes" in error(base64.b64encode(os.urandom(1500)).decode(), policy)
    # Not even valid base64 (bad length): the size alone refuses it.
    assert "limit of 1000 bytes" in error("data:image/png;base64," + "A" * 4001, policy)
    assert "limit of 1000 bytes" in error("A" * 5001, policy)
    assert load(data_url(PNG), MediaPolicy(max_bytes=len(PNG))).size == (3, 2)


def test_other_schemes_name_the_accepted_forms():
    message = error("ftp://example.com/cat.png")
    assert "unsupported image source" in message
    assert "http(s)://" in message and "data:image/" in message and "base64" in message


# ---- decoding ------------------------------------------------------------------------------


def test_garbage_and_non_images():
    assert "could not decode the image" in error(base64.b64encode(b"not an image!!!!").decode())
    pdf = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n"
    assert "could not decode the image" in error(data_url(pdf, "image/pdf"))


def test_unsupported_format_is_named():
    message = error(data_url(encode(pattern(), "TIFF"), "image/tiff"))
    assert "unsupported image format TIFF" in message and "PNG" in message


def test_truncated_png():
    png = encode(noise(), "PNG")
    message = error(data_url(png[: len(png) // 2]))
    assert message.startswith("could not decode the image: ")
    assert "Traceback" not in message and len(message) < 300


def test_zero_size_image():
    assert "could not decode the image" in error(data_url(png_header(0, 10)))


def test_pixel_limit():
    big = encode(Image.new("1", (5000, 5000)), "PNG")
    assert len(big) < 100_000
    message = error(data_url(big), MediaPolicy(max_pixels=5000 * 5000 - 1))
    assert "too many pixels" in message and "5000x5000" in message
    assert load(data_url(big), MediaPolicy(max_pixels=5000 * 5000)).size == (5000, 5000)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # No pixel data at all: decoding would fail, so only a header check gives this message.
    assert "too many pixels" in error(data_url(png_header(9000, 9000)))
    assert "could not decode" in error(data_url(png_header(90, 90)))


def test_decompression_bomb_beyond_pil_limit():
    message = error(data_url(png_header(20000, 20000)), MediaPolicy(max_pixels=10**12))
    assert "too many pixels" in message


# ---- local files ---------------------------------------------------------------------------


@pytest.fixture
def media(tmp_path: Path) -> Path:
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG)
    (root / "escape.png").symlink_to(tmp_path / "secret.png")
    (root / "inside.png").symlink_to(root / "a.png")
    return root


def test_local_file_under_allowed_dir(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    assert is_pattern(load(str(media / "a.png"), policy))
    assert load((media / "a.png").as_uri(), policy).size == (3, 2)
    assert load(f"file://localhost{media / 'a.png'}", policy).size == (3, 2)
    assert load(str(media / "inside.png"), policy).size == (3, 2)


def test_loaded_image_does_not_need_the_file(media: Path):
    image = load(str(media / "a.png"), MediaPolicy(allowed_local_path=media))
    (media / "a.png").unlink()
    assert image.getpixel((1, 0)) == BLUE


def test_local_file_outside_allowed_dir(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    for source in (
        str(media.parent / "secret.png"),
        str(media / ".." / "secret.png"),
        (media.parent / "secret.png").as_uri(),
        str(media / "escape.png"),  # a symlink out of the allowed directory
        "/etc/passwd",
    ):
        message = error(source, policy)
        assert "outside the directory allowed by --allowed-local-media-path" in message, source


def test_local_files_off_without_allowed_dir(media: Path):
    for source in (str(media / "a.png"), (media / "a.png").as_uri()):
        message = error(source)
        assert "disabled" in message and "--allowed-local-media-path DIR" in message


def test_local_file_errors(media: Path):
    policy = MediaPolicy(allowed_local_path=media)
    assert "No such file" in error(str(media / "missing.png"), policy)
    (media / "sub.d").mkdir()
    assert "not a regular file" in error(str(media / "sub.d"), policy)
    assert "limit of 50 bytes" in error(
        str(media / "a.png"), MediaPolicy(allowed_local_path=media, max_bytes=50)
    )
    assert "local file" in error("file://elsewhere/a.png", policy)
