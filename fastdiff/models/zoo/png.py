"""A grid of grayscale images written as a PNG with only zlib and struct (no imaging dependency)."""

from __future__ import annotations

import math
import struct
import zlib

import torch


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 4,
         lo: float = -1.0, hi: float = 1.0, invert: bool = True) -> torch.Tensor:
    """Tile ``[N, 1, H, W]`` (or ``[N, H, W]``) images into one uint8 ``[rows, cols]`` picture.

    Values in ``[lo, hi]`` map to 0..255 (clamped), inverted by default (ink dark on white, as
    scikit-learn draws the digits); each pixel becomes a ``scale`` x ``scale`` block; ``pad`` white
    pixels (before scaling) separate the cells; ``nrow`` images per row (default ``ceil(sqrt(N))``).
    """
    x = images.detach().to("cpu", torch.float32)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"images must have 1 channel, got shape {tuple(images.shape)}")
        x = x[:, 0]
    if x.dim() != 3 or x.shape[0] < 1:
        raise ValueError(f"images must be [N, 1, H, W] or [N, H, W] with N >= 1, got shape {tuple(images.shape)}")
    n, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_cells = min(n, nrow)
    nrow_cells = math.ceil(n / nrow)
    v = ((x - lo) / (hi - lo)).clamp(0, 1)
    if invert:
        v = 1 - v
    v = (v * 255).round().to(torch.uint8)
    canvas = torch.full((nrow_cells * (h + pad) + pad, ncol_cells * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = v[i]
    return canvas.repeat_interleave(scale, 0).repeat_interleave(scale, 1)


def write_png(path: str, gray: torch.Tensor) -> None:
    """Write a uint8 ``[H, W]`` grayscale picture as an 8-bit PNG (zlib-compressed, no filter)."""
    if gray.dtype != torch.uint8 or gray.dim() != 2:
        raise ValueError(f"gray must be a uint8 [H, W] tensor, got {gray.dtype} {tuple(gray.shape)}")
    h, w = gray.shape
    raw = b"".join(b"\x00" + bytes(row) for row in gray.tolist())  # filter byte 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)  # 8-bit grayscale, no interlace
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
