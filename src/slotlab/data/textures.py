"""Procedural solid textures for the ``tex`` scenes (CLEVRTex puts a texture on every object and on the floor).

A texture is a pattern ``p [3, P] -> v [P]`` in [0, 1] evaluated at 3D points (object-local coordinates for
objects, world coordinates for the floor), so no UV mapping is needed and a texture turns with its object. The
colour is ``mix(colour_a, colour_b, v)``. Every random choice is made once, in :func:`sample_texture`, from the
scene's generator; evaluation is a pure function of the :class:`Texture`.

Points are component-first (``[3, P]``) float32 arrays: numpy's float32 ``sin``/``floor``/``sqrt`` are vectorised and
an order of magnitude faster than float64 ones, and 3x3 products are written out instead of calling BLAS, whose
thread start-up dominates such thin products on a busy machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURE_KINDS = ("checker", "stripes", "dots", "noise", "marble", "wood", "bricks")
NOISE_PERIOD = 16  # lattice period of the value-noise table (a power of two: wrap with & instead of %)


@dataclass(frozen=True)
class Texture:
    """One sampled texture: a pattern kind, its frame and frequency, two linear-RGB colours and a noise table."""

    kind: str
    frequency: float  # pattern repeats per unit of the coordinates it is evaluated at
    frame: np.ndarray  # [3, 3] rotation applied to points before the pattern (random orientation)
    offset: np.ndarray  # [3] shift of the pattern
    colour_a: np.ndarray  # [3] linear RGB where the pattern is 0
    colour_b: np.ndarray  # [3] linear RGB where the pattern is 1
    noise_table: np.ndarray  # [NOISE_PERIOD ** 3] float32 lattice values of the value noise in [0, 1]


def rotate(matrix: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``matrix [3, 3] @ p [3, P]`` written out (9 multiply-adds per point, no BLAS call)."""
    m = matrix.astype(p.dtype)
    return np.stack([m[i, 0] * p[0] + m[i, 1] * p[1] + m[i, 2] * p[2] for i in range(3)])


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3D rotation matrix (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def sample_texture(rng: np.random.Generator, colour_a: np.ndarray, colour_b: np.ndarray,
                   frequency_range: tuple[float, float], kind: str | None = None,
                   upright: bool = False) -> Texture:
    """Draw a texture: kind (uniform over :data:`TEXTURE_KINDS` unless given), frequency, frame and noise table.

    ``upright`` only turns the pattern about the vertical axis (for the floor, whose points all have z = 0).
    """
    kind = kind or TEXTURE_KINDS[int(rng.integers(len(TEXTURE_KINDS)))]
    if upright:
        angle = rng.uniform(0, 2 * np.pi)
        frame = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    else:
        frame = random_rotation(rng)
    offset = rng.uniform(0, 10, size=3)
    if upright:
        offset[2] = 0.0  # the floor plane then passes through lattice points (dots centred on it, not cut off)
    return Texture(kind=kind, frequency=float(rng.uniform(*frequency_range)), frame=frame,
                   offset=offset, colour_a=np.asarray(colour_a, dtype=np.float32),
                   colour_b=np.asarray(colour_b, dtype=np.float32),
                   noise_table=rng.uniform(0, 1, size=NOISE_PERIOD**3).astype(np.float32))


def value_noise(p: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Smooth lattice noise in [0, 1] at points ``p [3, P]`` (trilinear over a periodic random table)."""
    cell = np.floor(p)
    f = p - cell  # [3, P]
    u = f * f * (3.0 - 2.0 * f)  # smoothstep weights: no visible lattice creases
    i = cell.astype(np.int32) & (NOISE_PERIOD - 1)
    j = (i + 1) & (NOISE_PERIOD - 1)
    x0, x1 = i[0] * NOISE_PERIOD**2, j[0] * NOISE_PERIOD**2
    y0, y1 = i[1] * NOISE_PERIOD, j[1] * NOISE_PERIOD
    z0, z1 = i[2], j[2]

    def along_z(xy: np.ndarray) -> np.ndarray:  # interpolate between the two lattice planes
        low = np.take(table, xy + z0)
        return low + u[2] * (np.take(table, xy + z1) - low)

    def along_y(x: np.ndarray) -> np.ndarray:
        low = along_z(x + y0)
        return low + u[1] * (along_z(x + y1) - low)

    low = along_y(x0)
    return low + u[0] * (along_y(x1) - low)


def fbm(p: np.ndarray, table: np.ndarray, octaves: int = 3) -> np.ndarray:
    """Fractal sum of :func:`value_noise` octaves, in [0, 1]."""
    total = np.zeros(p.shape[1], dtype=p.dtype)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        total += np.float32(amplitude) * value_noise(p * np.float32(2.0**octave) + np.float32(17.0 * octave), table)
        norm += amplitude
        amplitude *= 0.5
    return total / np.float32(norm)


def _soft_step(x: np.ndarray, sharpness: float) -> np.ndarray:
    """A steep but smooth 0 -> 1 step around x = 0 (softens pattern edges, which limits aliasing)."""
    return np.clip(np.float32(0.5) + np.float32(sharpness) * x, 0.0, 1.0)


def pattern(texture: Texture, p: np.ndarray) -> np.ndarray:
    """The texture's pattern value in [0, 1] at points ``p [3, P]`` (float32)."""
    q = rotate(texture.frame.T * texture.frequency, p.astype(np.float32))
    q += texture.offset.astype(np.float32)[:, None]  # [3, P] pattern coordinates
    kind, two_pi = texture.kind, np.float32(2 * np.pi)
    if kind == "checker":
        return (np.floor(q[0]) + np.floor(q[1]) + np.floor(q[2])) % 2
    if kind == "stripes":
        return _soft_step(np.sin(two_pi * q[0]), 2.0)
    if kind == "dots":
        offset = q - np.round(q)
        distance = np.sqrt(offset[0] ** 2 + offset[1] ** 2 + offset[2] ** 2)  # to the nearest lattice point
        return _soft_step(0.32 - distance, 20.0)
    if kind == "noise":
        return np.clip((fbm(q, texture.noise_table) - 0.5) * 2.5 + 0.5, 0.0, 1.0)
    if kind == "marble":
        turbulence = fbm(q * np.float32(0.7), texture.noise_table)
        return 0.5 + 0.5 * np.sin(two_pi * (q[0] + np.float32(2.5) * turbulence))
    if kind == "wood":
        rings = np.sqrt(q[0] ** 2 + q[1] ** 2) * 1.5 + 0.8 * fbm(q * np.float32(0.5), texture.noise_table)
        return (rings - np.floor(rings)) ** 2
    if kind == "bricks":
        rows = q[1] * 2.0
        x = q[0] + 0.5 * (np.floor(rows) % 2)  # every other row shifted by half a brick
        mortar = np.minimum(np.abs(x - np.round(x)), np.abs(rows - np.round(rows)) * 0.5)
        return _soft_step(mortar - 0.04, 25.0)
    raise ValueError(f"unknown texture kind {kind!r}")


def shade(texture: Texture, p: np.ndarray, blur: np.ndarray | float = 0.0) -> np.ndarray:
    """Linear-RGB float32 colour ``[3, P]`` of the texture at points ``p [3, P]``.

    ``blur`` in [0, 1] (per point) fades the pattern towards its mean colour where a pixel covers many periods
    (far floor), a cheap stand-in for mip-mapping with one ray per pixel.
    """
    v = pattern(texture, p).astype(np.float32)
    v += (np.float32(0.5) - v) * np.clip(blur, 0.0, 1.0).astype(np.float32)
    return texture.colour_a[:, None] + v[None, :] * (texture.colour_b - texture.colour_a)[:, None]
