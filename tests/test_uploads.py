"""Edit uploads (serve_app/uploads.py) and the edit input rules (serve_app/engines/edit_inputs.py), without
Ray: every hostile upload is an APIError naming its field, decided as early as the issue asks."""

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app.config import ServerConfig
from serve_app.engines.edit_inputs import fit_size, latent_mask, openai_mask
from serve_app.openai_api import APIError
from serve_app.uploads import load_edit_inputs, open_header, output_size

SERVER = ServerConfig(min_size=32, max_size=512, default_size="64x64", max_upload_bytes=200_000, max_upload_pixels=1_000_000)


def encode(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8), "RGB")


def refused(fn, field, status=400):
    with pytest.raises(APIError) as e:
        fn()
    assert e.value.status == status and e.value.param == field, (e.value.status, e.value.param, e.value.message)
    assert e.value.body()["error"]["param"] == field
    return e.value


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) IDAT: a bomb's header in 60 bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


# ---- the size rule ----------------------------------------------------------------------------
@pytest.mark.parametrize("w, h, expected", [
    (64, 48, (64, 48)),          # within bounds, multiples of 16: unchanged
    (70, 50, (64, 48)),          # within bounds: rounded down to 16, as diffusers' VaeImageProcessor does
    (1024, 768, (512, 384)),     # too large: scaled to max_size on the longer side, aspect kept
    (4000, 3000, (512, 384)),
    (20, 20, (32, 32)),          # too small: scaled up to min_size on the shorter side
    (30, 20, (48, 32)),
    (2000, 100, (512, 32)),      # too thin for both bounds: the shorter side at min_size, the longer clamped
])
def test_fit_size(w, h, expected):
    assert fit_size(w, h, SERVER.min_size, SERVER.max_size, SERVER.size_multiple) == expected


def test_output_size_applies_exif_orientation_from_the_header():
    img = gradient(96, 64)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90: the picture is 64 wide, 96 high
    assert output_size(encode(img, "JPEG", exif=exif), SERVER) == (64, 96)


# ---- hostile uploads --------------------------------------------------------------------------
def test_not_an_image():
    refused(lambda: load_edit_inputs(b"this is not an image at all", None, 64, 48, SERVER), "image")
    refused(lambda: load_edit_inputs(b"", None, 64, 48, SERVER), "image")


def test_a_format_other_than_png_jpeg_webp():
    refused(lambda: load_edit_inputs(encode(gradient(), "GIF"), None, 64, 48, SERVER), "image")
    refused(lambda: load_edit_inputs(encode(gradient(), "BMP"), None, 64, 48, SERVER), "image")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_truncated_file(fmt):
    data = encode(gradient(), fmt)
    e = refused(lambda: load_edit_inputs(data[: len(data) * 2 // 3], None, 64, 48, SERVER), "image")
    assert "decoded" in e.message or "unreadable" in e.message


def test_decompression_bomb_is_refused_from_its_header():
    bomb = png_header_only(40_000, 40_000)
    assert len(bomb) < 200
    opened = []
    real_open = Image.Image.load

    def spy(self):
        opened.append(self.size)
        return real_open(self)

    Image.Image.load = spy  # records any decode; the refusal must come before one
    try:
        # 1.6 G pixels: past Pillow's own bomb limit (2 x 89.5 MP), which Image.open raises; ours all the same
        e = refused(lambda: load_edit_inputs(bomb, None, 64, 48, SERVER), "image")
        refused(lambda: output_size(bomb, SERVER), "image")
        assert e.code == "image_too_large"
        # under Pillow's limit, over ours: refused by our header check, naming the size
        e = refused(lambda: load_edit_inputs(png_header_only(3000, 3000), None, 64, 48, SERVER), "image")
        assert "3000x3000" in e.message and e.code == "image_too_large"
    finally:
        Image.Image.load = real_open
    assert opened == []
    refused(lambda: open_header(png_header_only(20_000, 20_000), "image", ServerConfig(max_upload_pixels=10**9)), "image")


def test_over_the_byte_limit_is_413():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    data = encode(noise)
    assert len(data) > SERVER.max_upload_bytes
    refused(lambda: load_edit_inputs(data, None, 64, 48, SERVER), "image", status=413)
    refused(lambda: load_edit_inputs(encode(gradient()), data, 64, 48, SERVER), "mask", status=413)


def test_animated_files_use_the_first_frame():
    frames = [Image.new("RGB", (64, 48), c) for c in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    for fmt in ("PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **({"lossless": True} if fmt == "WEBP" else {}))
        assert Image.open(io.BytesIO(data)).n_frames == 3
        px = load_edit_inputs(data, None, 64, 48, SERVER).pixels
        assert px.shape == (48, 64, 3) and tuple(px[10, 10].tolist()) == (250, 0, 0)


def test_cmyk_16bit_palette_and_alpha_images_are_converted_to_rgb():
    rgb = gradient()
    cases = {
        "CMYK": encode(rgb.convert("CMYK"), "JPEG", quality=95),
        "I;16": encode(Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)),
        "P": encode(rgb.convert("P")),
        "RGBA": encode(rgb.convert("RGBA")),
        "LA": encode(rgb.convert("LA")),
    }
    for mode, data in cases.items():
        px = load_edit_inputs(data, None, 64, 48, SERVER).pixels
        assert px.shape == (48, 64, 3) and px.dtype == torch.uint8, mode
        expected = np.asarray(rgb.convert("L") if mode in ("I;16", "LA") else rgb.convert("P").convert("RGB") if mode == "P" else rgb).astype(int)
        got = px.numpy().astype(int)
        got = got[..., 0] if mode in ("I;16", "LA") else got
        # 16-bit: scaled to 8 bits exactly; palette: its colours exactly; CMYK JPEG: lossy (mean error under 15)
        tol = {"I;16": 0, "RGBA": 0, "LA": 0, "P": 0, "CMYK": 60}[mode]
        assert np.abs(got - expected).mean() <= max(tol / 4, 0.01) and (tol > 0 or np.array_equal(got, expected)), mode


def test_exif_orientation_is_applied():
    img = gradient(96, 64)
    exif = img.getexif()
    exif[0x0112] = 6
    px = load_edit_inputs(encode(img, "JPEG", exif=exif, quality=100), None, 64, 96, SERVER).pixels
    want = np.asarray(img.transpose(Image.Transpose.ROTATE_270)).astype(int)
    assert px.shape == (96, 64, 3) and np.abs(px.numpy().astype(int) - want).mean() < 3


def test_mask_size_must_match_the_image():
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    e = refused(lambda: load_edit_inputs(encode(gradient()), encode(mask), 64, 48, SERVER), "mask")
    assert "same size" in e.message


def test_mask_without_transparency_or_not_png_is_refused():
    refused(lambda: load_edit_inputs(encode(gradient()), encode(gradient()), 64, 48, SERVER), "mask")
    refused(lambda: load_edit_inputs(encode(gradient()), encode(gradient(), "JPEG"), 64, 48, SERVER), "mask")
    refused(lambda: load_edit_inputs(encode(gradient()), b"garbage", 64, 48, SERVER), "mask")


def test_mask_follows_openai_convention_transparent_is_painted():
    a = np.full((48, 64), 255, np.uint8)
    a[16:32, 0:32] = 0  # transparent: repaint
    mask = Image.fromarray(np.dstack([np.zeros((48, 64, 3), np.uint8), a]), "RGBA")
    m = load_edit_inputs(encode(gradient()), encode(mask), 64, 48, SERVER).mask
    assert m.shape == (6, 8) and m.dtype == torch.uint8
    expected = np.zeros((6, 8), np.uint8)
    expected[2:4, 0:4] = 1
    assert np.array_equal(m.numpy(), expected)
    # the same as diffusers' white-is-paint mask of 255 - alpha
    assert torch.equal(latent_mask(openai_mask(Image.fromarray(a, "L")), 64, 48), m)
    # a palette PNG with a transparent index is a mask too
    p = mask.convert("P")
    assert "transparency" in Image.open(io.BytesIO(encode(p))).info
    assert torch.equal(load_edit_inputs(encode(gradient()), encode(p), 64, 48, SERVER).mask, m)
