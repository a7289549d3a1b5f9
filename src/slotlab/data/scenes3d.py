"""CLEVR-like 3D scenes drawn by vectorised ray casting (numpy only, no external renderer).

A scene is CLEVR's set-up: an infinite ground plane ``z = 0`` seen by a camera looking down at ~26 degrees (CLEVR's
camera position, jittered), one directional key light with hard shadows (one shadow ray per pixel), a fill light and
sky ambient, and 3-10 objects standing on the ground. Objects are spheres, cubes, cylinders (and, held out by
default, cones and tori), in three sizes, turned about the vertical axis, matte ``rubber`` or shiny ``metal`` (a
specular highlight and a reflection of the sky). Variant ``clevr`` paints objects in CLEVR's eight plain colours on a
grey floor; variant ``tex`` covers objects and floor with procedural textures (:mod:`slotlab.data.textures`).

Every ray is intersected analytically (sphere: quadratic; cube: slabs; cylinder and cone: quadratic + caps; torus:
sphere tracing of its distance function), only inside the screen rectangle of the object's bounding sphere, and
shadow rays only where they pass the object's bounding sphere, which keeps a 240x320 scene at a few tens of ms.

Objects never interpenetrate (their ground footprints, discs of radius ``r``, keep a gap) and each keeps at least
``MIN_VISIBLE_FRACTION`` of the image visible; a layout that fails is redrawn. Scene ``index`` of a ``seed`` draws its
layout from ``default_rng([seed, index, 0])`` and its appearance from ``default_rng([seed, index, 1])``: the same seed
gives the same bytes in any process, and ``clevr`` and ``tex`` renders of one seed share layouts and masks.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slotlab.data.properties import COLOR_RGB, COLORS, RENDERED_MATERIALS, SIZE_RADIUS, SIZES
from slotlab.data.textures import Texture, rotate, sample_texture, shade

EPS = 1e-4  # smallest accepted ray distance (avoids re-hitting the surface a shadow ray starts on)
MIN_OBJECTS, MAX_OBJECTS = 3, 10
MIN_GAP = 0.1  # free space between object footprints (scene units; the floor spans [-3, 3]^2)
MIN_VISIBLE_FRACTION = 200 / (240 * 320)  # CLEVR keeps >= 200 visible pixels per object at 240x320
CLEVR_CAMERA = np.array([7.358891487121582, -6.925790786743164, 4.958309173583984])
CAMERA_JITTER = 0.5
FOV_X = 2 * math.atan(16 / 35)  # CLEVR's 35 mm lens on a 32 mm sensor: 49.1 degrees across
MAX_LAYOUT_ATTEMPTS = 200


def srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    """8-bit sRGB-like colour -> linear light (gamma 2.2), where shading adds and multiplies."""
    return (np.asarray(rgb, dtype=np.float64) / 255.0) ** 2.2


def hsv_to_linear(hue: float, saturation: float, value: float) -> np.ndarray:
    return srgb_to_linear(255 * np.array(colorsys.hsv_to_rgb(hue, saturation, value)))


# ---------------------------------------------------------------------------------------------------- camera
@dataclass(frozen=True)
class Camera:
    """A pinhole camera: position, orthonormal (right, up, forward) axes and field of view."""

    position: np.ndarray  # [3]
    right: np.ndarray  # [3]
    up: np.ndarray  # [3]
    forward: np.ndarray  # [3]
    height: int
    width: int
    tan_x: float = math.tan(FOV_X / 2)

    @property
    def tan_y(self) -> float:
        return self.tan_x * self.height / self.width

    def ray_directions(self) -> np.ndarray:
        """Unit directions through the pixel centres, component-first ``[3, H, W]``."""
        u = (2 * (np.arange(self.width) + 0.5) / self.width - 1) * self.tan_x  # [W]
        v = (1 - 2 * (np.arange(self.height) + 0.5) / self.height) * self.tan_y  # [H]
        dirs = (self.forward[:, None, None] + u[None, None, :] * self.right[:, None, None]
                + v[None, :, None] * self.up[:, None, None])  # [3, H, W]
        return dirs / np.sqrt((dirs * dirs).sum(0))

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World points ``[P, 3]`` -> continuous pixel x (right), y (down) and depth along the view axis."""
        rel = np.asarray(points, dtype=np.float64) - self.position  # [P, 3]
        depth = (rel * self.forward).sum(1)
        px = ((rel * self.right).sum(1) / depth / self.tan_x + 1) * self.width / 2
        py = (1 - (rel * self.up).sum(1) / depth / self.tan_y) * self.height / 2
        return px, py, depth

    def screen_rect(self, centre: np.ndarray, radius: float) -> tuple[int, int, int, int]:
        """Pixel rectangle ``(y0, y1, x0, x1)`` holding the projection of a sphere (via its bounding cube)."""
        corners = centre + radius * np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        px, py, depth = self.project(corners)
        if np.any(depth <= EPS):
            return 0, self.height, 0, self.width
        x0, x1 = int(np.floor(px.min())) - 1, int(np.ceil(px.max())) + 1
        y0, y1 = int(np.floor(py.min())) - 1, int(np.ceil(py.max())) + 1
        return max(y0, 0), min(y1, self.height), max(x0, 0), min(x1, self.width)


def look_at_camera(position: np.ndarray, target: np.ndarray, height: int, width: int) -> Camera:
    forward = target - position
    forward = forward / np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right = right / np.linalg.norm(right)
    up = np.cross(right, forward)
    return Camera(position=position, right=right, up=up, forward=forward, height=height, width=width)


# ---------------------------------------------------------------------------------------------------- objects
@dataclass(frozen=True)
class SceneObject:
    """One object: geometry (shape, size, ground position, turn about z) and appearance."""

    shape: str
    size: str
    x: float
    y: float
    rotation: float  # degrees about the vertical axis
    material: str = "rubber"
    color: str = "gray"
    texture: Texture | None = None

    @property
    def r(self) -> float:
        """CLEVR's size radius; the ground footprint of every shape fits in a disc of this radius."""
        return SIZE_RADIUS[self.size]

    @property
    def centre(self) -> np.ndarray:
        half_height = {"cube": self.r / math.sqrt(2), "torus": 0.3 * self.r}.get(self.shape, self.r)
        return np.array([self.x, self.y, half_height])

    @property
    def bound_radius(self) -> float:
        """Radius of a sphere about :attr:`centre` that holds the whole object."""
        return {"sphere": 1.0, "cube": math.sqrt(1.5), "torus": 1.0}.get(self.shape, math.sqrt(2)) * self.r

    @property
    def frame(self) -> np.ndarray:
        """``[3, 3]`` rotation whose columns are the object's axes in world coordinates."""
        a = math.radians(self.rotation)
        return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def _first_hit(*candidates: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Smallest ray distance among ``(t, valid)`` candidates; ``inf`` where none is valid."""
    best = None
    for t, valid in candidates:
        t = np.where(valid & (t > EPS), t, np.inf)
        best = t if best is None else np.minimum(best, t)
    return best


def _quadratic_roots(a, b, c) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Roots of ``a t^2 + 2 b t + c = 0`` (near, far) and whether they are real."""
    disc = b * b - a * c
    real = (disc >= 0) & (np.abs(a) > 1e-12)
    root = np.sqrt(np.maximum(disc, 0.0))
    safe_a = np.where(real, a, 1.0)
    return (-b - root) / safe_a, (-b + root) / safe_a, real


def intersect(obj: SceneObject, o: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Distance along each ray to ``obj`` (``inf`` on a miss).

    Args:
        obj: the object.
        o: ray origins ``[3, P]`` (or one origin ``[3]``) in the object's frame (centre at 0, axes of :attr:`frame`).
        d: unit ray directions ``[3, P]`` in the object's frame.
    """
    r = obj.r
    ox, oy, oz = o[0], o[1], o[2]
    dx, dy, dz = d[0], d[1], d[2]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if obj.shape == "sphere":
            near, far, real = _quadratic_roots(1.0, ox * dx + oy * dy + oz * dz, ox * ox + oy * oy + oz * oz - r * r)
            return _first_hit((near, real), (far, real))
        if obj.shape == "cube":
            h = r / math.sqrt(2)
            o3 = o.reshape(3, -1)
            t1, t2 = (-h - o3) / d, (h - o3) / d  # [3, P] slab entries and exits
            t_in = np.fmax.reduce(np.fmin(t1, t2), axis=0)
            t_out = np.fmin.reduce(np.fmax(t1, t2), axis=0)
            hit = t_out >= np.maximum(t_in, EPS)
            return _first_hit((t_in, hit), (t_out, hit))
        if obj.shape == "cylinder":  # radius r, from z = -r to z = +r
            near, far, real = _quadratic_roots(dx * dx + dy * dy, ox * dx + oy * dy, ox * ox + oy * oy - r * r)
            side = [(t, real & (np.abs(oz + t * dz) <= r)) for t in (near, far)]
            caps = [(t, (ox + t * dx) ** 2 + (oy + t * dy) ** 2 <= r * r) for t in ((r - oz) / dz, (-r - oz) / dz)]
            return _first_hit(*side, *caps)
        if obj.shape == "cone":  # apex at z = +r, base disc of radius r at z = -r
            k2 = 0.25  # (base radius / height)^2
            w = r - oz
            near, far, real = _quadratic_roots(dx * dx + dy * dy - k2 * dz * dz, ox * dx + oy * dy + k2 * w * dz,
                                               ox * ox + oy * oy - k2 * w * w)
            side = [(t, real & (np.abs(oz + t * dz) <= r)) for t in (near, far)]
            t_base = (-r - oz) / dz
            base = (t_base, (ox + t_base * dx) ** 2 + (oy + t_base * dy) ** 2 <= r * r)
            return _first_hit(*side, base)
        if obj.shape == "torus":
            return _trace_torus(np.broadcast_to(o.reshape(3, -1), d.shape), d, 0.7 * r, 0.3 * r)
    raise ValueError(f"unknown shape {obj.shape!r}")


def _torus_distance(p: np.ndarray, major: float, minor: float) -> np.ndarray:
    return np.hypot(np.hypot(p[0], p[1]) - major, p[2]) - minor


def _trace_torus(o: np.ndarray, d: np.ndarray, major: float, minor: float, steps: int = 64) -> np.ndarray:
    """Sphere tracing of a flat torus (its distance function is exact, so steps never overshoot)."""
    radius = major + minor
    b = (o * d).sum(0)
    disc = b * b - ((o * o).sum(0) - radius * radius)
    t_hit = np.full(d.shape[1], np.inf)
    rays = np.flatnonzero(disc > 0)
    if len(rays) == 0:
        return t_hit
    root = np.sqrt(disc[rays])
    t, t_exit = np.maximum(-b[rays] - root, 0.0), -b[rays] + root
    o, d = o[:, rays], d[:, rays]
    for _ in range(steps):
        t = t + _torus_distance(o + t * d, major, minor)
    hit = (np.abs(_torus_distance(o + t * d, major, minor)) < 1e-3) & (t <= t_exit) & (t > EPS)
    t_hit[rays[hit]] = t[hit]
    return t_hit


def surface_normal(obj: SceneObject, p: np.ndarray) -> np.ndarray:
    """Unit outward normals ``[3, P]`` at surface points ``p [3, P]`` given in the object's frame."""
    r = obj.r
    x, y, z = p
    if obj.shape == "sphere":
        n = p.copy()
    elif obj.shape == "cube":
        face = np.argmax(np.abs(p), axis=0)  # the face is the axis where the point is farthest out
        n = np.zeros_like(p)
        columns = np.arange(p.shape[1])
        n[face, columns] = np.sign(p[face, columns])
    elif obj.shape == "cylinder":
        radial = np.sqrt(x * x + y * y)
        on_cap = np.abs(np.abs(z) - r) < np.abs(radial - r)
        n = np.where(on_cap, np.stack([0 * x, 0 * y, np.sign(z)]), np.stack([x, y, 0 * z]))
    elif obj.shape == "cone":
        on_base = z < -r + 1e-4
        side = np.stack([x, y, 0.25 * (r - z)])  # gradient of x^2 + y^2 - k^2 (r - z)^2
        n = np.where(on_base, np.array([[0.0], [0.0], [-1.0]]), side)
    elif obj.shape == "torus":
        scale = 1 - 0.7 * r / np.maximum(np.sqrt(x * x + y * y), 1e-9)
        n = np.stack([x * scale, y * scale, z])
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return n / np.maximum(np.sqrt((n * n).sum(0)), 1e-12)


# ---------------------------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A sampled scene: camera, objects (object ``m`` has mask id ``m + 1``), light and floor."""

    camera: Camera
    objects: list[SceneObject]
    light: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 1.0]))  # [3] unit, towards the light
    floor_colour: np.ndarray = field(default_factory=lambda: np.full(3, 0.22))  # linear RGB
    floor_texture: Texture | None = None


def sample_layout(rng: np.random.Generator, shapes: tuple[str, ...], height: int, width: int,
                  min_objects: int = MIN_OBJECTS, max_objects: int = MAX_OBJECTS) -> Scene:
    """Camera and object geometry (CLEVR's placement: uniform on [-3, 3]^2, footprints kept apart)."""
    while True:
        camera = look_at_camera(CLEVR_CAMERA + rng.uniform(-CAMERA_JITTER, CAMERA_JITTER, size=3), np.zeros(3),
                                height, width)
        num_objects = int(rng.integers(min_objects, max_objects + 1))
        objects: list[SceneObject] = []
        for _ in range(num_objects):
            for _attempt in range(100):
                shape = shapes[int(rng.integers(len(shapes)))]
                size = SIZES[int(rng.integers(len(SIZES)))]
                x, y = rng.uniform(-3, 3, size=2)
                r = SIZE_RADIUS[size]
                if all(math.hypot(x - o.x, y - o.y) >= r + o.r + MIN_GAP for o in objects):
                    objects.append(SceneObject(shape, size, float(x), float(y), float(rng.uniform(0, 360))))
                    break
            else:
                break  # too crowded: draw the whole layout again
        if len(objects) == num_objects:
            return Scene(camera=camera, objects=objects)


def sample_appearance(rng: np.random.Generator, scene: Scene, variant: str) -> Scene:
    """Materials, colours, textures (variant ``tex``), the key light and the floor."""
    objects = []
    for obj in scene.objects:
        material = RENDERED_MATERIALS[int(rng.integers(len(RENDERED_MATERIALS)))]
        color = COLORS[int(rng.integers(len(COLORS)))]
        texture = None
        if variant == "tex":
            base = srgb_to_linear(COLOR_RGB[color])
            # A two-tone pattern of the object's own colour, so "color" stays a property of the object.
            other = base * rng.uniform(0.15, 0.4) if rng.uniform() < 0.5 else base + (1 - base) * rng.uniform(0.4, 0.7)
            texture = sample_texture(rng, base, other, (1.2, 3.0))
        objects.append(SceneObject(obj.shape, obj.size, obj.x, obj.y, obj.rotation, material, color, texture))
    azimuth = math.radians(rng.uniform(-60, 10))  # from the camera's left, as CLEVR's key light
    elevation = math.radians(rng.uniform(35, 65))
    light = np.array([math.cos(azimuth) * math.cos(elevation), math.sin(azimuth) * math.cos(elevation),
                      math.sin(elevation)])
    floor_colour = np.full(3, rng.uniform(0.16, 0.28))
    floor_texture = None
    if variant == "tex":
        hue, sat = rng.uniform(0, 1), rng.uniform(0.05, 0.6)
        floor_a = hsv_to_linear(hue, sat, rng.uniform(0.35, 0.8))
        floor_b = hsv_to_linear((hue + rng.uniform(-0.15, 0.15)) % 1, rng.uniform(0.05, 0.6), rng.uniform(0.15, 0.6))
        floor_texture = sample_texture(rng, floor_a, floor_b, (0.5, 1.6), upright=True)
    elif variant != "clevr":
        raise ValueError(f"unknown variant {variant!r}")
    return Scene(scene.camera, objects, light, floor_colour, floor_texture)


# ---------------------------------------------------------------------------------------------------- ray casting
def _dot(vector: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``vector [3] . p [3, P]`` -> ``[P]``."""
    return vector[0] * p[0] + vector[1] * p[1] + vector[2] * p[2]


def _to_object_frame(obj: SceneObject, points: np.ndarray) -> np.ndarray:
    """World points ``[3, P]`` (or one point ``[3]``) -> the object's frame."""
    if points.ndim == 1:
        return obj.frame.T @ (points - obj.centre)
    return rotate(obj.frame.T, points - obj.centre[:, None])


def trace_primary(scene: Scene, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth ``[H, W]`` (distance along the camera ray; inf = sky) and object ids ``[H, W]`` (0 = floor or sky)."""
    cam = scene.camera
    with np.errstate(divide="ignore"):
        depth = np.where(dirs[2] < -1e-9, -cam.position[2] / dirs[2], np.inf)  # the floor z = 0
    ids = np.zeros(depth.shape, dtype=np.uint8)
    for m, obj in enumerate(scene.objects):
        y0, y1, x0, x1 = cam.screen_rect(obj.centre, obj.bound_radius)
        if y0 >= y1 or x0 >= x1:
            continue
        d = rotate(obj.frame.T, dirs[:, y0:y1, x0:x1].reshape(3, -1))  # [3, P] in the object's frame
        t = intersect(obj, _to_object_frame(obj, cam.position), d).reshape(y1 - y0, x1 - x0)
        closer = t < depth[y0:y1, x0:x1]
        depth[y0:y1, x0:x1][closer] = t[closer]
        ids[y0:y1, x0:x1][closer] = m + 1
    return depth, ids


def _shadowed_by(obj: SceneObject, points: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Whether the ray from each point ``[3, P]`` towards the light hits ``obj``, ``[P]`` bool."""
    d = np.broadcast_to((obj.frame.T @ light)[:, None], points.shape)
    return intersect(obj, _to_object_frame(obj, points), d) < np.inf


def floor_shadows(scene: Scene, dirs: np.ndarray, depth: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Key-light shadows on visible floor pixels, ``[H, W]`` bool.

    The floor shadow of an object lies within ``bound_radius / light_z`` of where the light ray through its centre
    meets the floor, so only the screen rectangle of that disc is tested.
    """
    cam, light = scene.camera, scene.light
    shadow = np.zeros(depth.shape, dtype=bool)
    for obj in scene.objects:
        centre = obj.centre
        foot = centre - centre[2] / light[2] * light  # [3], on the floor
        reach = obj.bound_radius / light[2]
        corners = np.array([[foot[0] + sx * reach, foot[1] + sy * reach, 0.0] for sx in (-1, 1) for sy in (-1, 1)])
        px, py, z = cam.project(corners)
        if np.any(z <= EPS):
            y0, y1, x0, x1 = 0, depth.shape[0], 0, depth.shape[1]
        else:
            x0, x1 = max(int(np.floor(px.min())) - 1, 0), min(int(np.ceil(px.max())) + 1, depth.shape[1])
            y0, y1 = max(int(np.floor(py.min())) - 1, 0), min(int(np.ceil(py.max())) + 1, depth.shape[0])
        region = (ids[y0:y1, x0:x1] == 0) & np.isfinite(depth[y0:y1, x0:x1]) & ~shadow[y0:y1, x0:x1]
        rows, cols = np.nonzero(region)
        if len(rows) == 0:
            continue
        rows, cols = rows + y0, cols + x0
        points = cam.position[:, None] + depth[rows, cols] * dirs[:, rows, cols]  # [3, P] on the floor
        points[2] = 2e-3  # lift off the floor so the shadow ray does not start below it
        shadow[rows, cols] = _shadowed_by(obj, points, light)
    return shadow


def object_shadows(scene: Scene, points: np.ndarray) -> np.ndarray:
    """Key-light shadows at object surface points ``[3, P]`` (already lifted off their surface), ``[P]`` bool."""
    light = scene.light
    # Only objects whose bounding sphere the shadow ray passes can cast a shadow: test that first.
    shadowed = np.zeros(points.shape[1], dtype=bool)
    for obj in scene.objects:
        rel = obj.centre[:, None] - points  # [3, P]
        along = _dot(light, rel)  # distance to the centre along the ray
        across_sq = (rel * rel).sum(0) - along * along
        rays = np.flatnonzero((across_sq < obj.bound_radius**2) & (along > -obj.bound_radius) & ~shadowed)
        if len(rays):
            shadowed[rays] = _shadowed_by(obj, points[:, rays], light)
    return shadowed


GAMMA_LEVELS = 4096
# linear -> 8-bit sRGB-like (gamma 2.2) by table lookup: a float power over every pixel costs more than the tracing.
GAMMA_TABLE = np.round(255 * (np.arange(GAMMA_LEVELS) / (GAMMA_LEVELS - 1)) ** (1 / 2.2)).astype(np.uint8)
SUN = np.array([1.0, 0.97, 0.92], dtype=np.float32) * 2.1  # key light colour x intensity
FILL, AMBIENT = 0.35, 0.3  # fill light and sky ambient strengths
SKY = np.array([0.45, 0.5, 0.58], dtype=np.float32)  # linear RGB of rays that miss the floor


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """Ray cast a scene: uint8 RGB ``[H, W, 3]`` and uint8 object ids ``[H, W]`` (0 = background)."""
    dirs = scene.camera.ray_directions()  # [3, H, W]
    depth, ids = trace_primary(scene, dirs)
    return shade_scene(scene, dirs, depth, ids), ids


def _fill_direction(light: np.ndarray) -> np.ndarray:
    fill = np.array([-light[0], -light[1], 0.6])  # opposite the key light, from above
    return fill / np.linalg.norm(fill)


def shade_floor(scene: Scene, dirs: np.ndarray, shadow: np.ndarray) -> np.ndarray:
    """Linear RGB ``[3, H, W]`` of the floor seen through every pixel: albedo x (key light unless shadowed + fill +
    ambient). Computed densely (objects are painted over it afterwards): cheaper than gathering floor pixels."""
    cam, light = scene.camera, scene.light
    if scene.floor_texture is not None:
        down = np.maximum(-dirs[2], np.float32(1e-3))  # [H, W]; rays that miss the floor are overwritten by sky
        t = np.float32(cam.position[2]) / down  # distance to the floor z = 0
        points = cam.position.astype(np.float32)[:, None, None] + t * dirs  # [3, H, W]
        # One ray per pixel: fade the pattern where a pixel's footprint on the floor spans many periods.
        footprint = t * np.float32(2 * cam.tan_x / cam.width) / np.maximum(down, np.float32(0.05))
        blur = footprint * np.float32(scene.floor_texture.frequency * 1.5) - np.float32(0.3)
        albedo = shade(scene.floor_texture, points.reshape(3, -1), blur.ravel()).reshape(3, *shadow.shape)
    else:
        albedo = scene.floor_colour.astype(np.float32)[:, None, None]
    lit = np.float32(light[2]) * ~shadow  # n . l with n = up
    ambient = np.float32(FILL * _fill_direction(light)[2] + AMBIENT)
    return albedo * (lit * SUN[:, None, None] + ambient)


def shade_objects(scene: Scene, dirs: np.ndarray, depth: np.ndarray, ids: np.ndarray,
                  pixels: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Linear RGB ``[3, P]`` of object pixels: Lambert + shadows + fill + ambient; Blinn-Phong highlights; metal
    also mirrors a sky gradient tinted by its colour."""
    cam, light = scene.camera, scene.light
    d = dirs[:, pixels[0], pixels[1]]  # [3, P]
    points = cam.position[:, None] + depth[pixels] * d  # [3, P]
    pixel_ids = ids[pixels]
    normal = np.empty_like(points)
    albedo = np.empty(points.shape, dtype=np.float32)
    metal = np.zeros(points.shape[1], dtype=bool)
    for m, obj in enumerate(scene.objects):
        sel = np.flatnonzero(pixel_ids == m + 1)
        if len(sel) == 0:
            continue
        local = _to_object_frame(obj, points[:, sel])  # [3, S]
        normal[:, sel] = rotate(obj.frame, surface_normal(obj, local))
        if obj.texture is not None:
            albedo[:, sel] = shade(obj.texture, local / obj.r)
        else:
            albedo[:, sel] = srgb_to_linear(COLOR_RGB[obj.color]).astype(np.float32)[:, None]
        metal[sel] = obj.material == "metal"
    shadowed = object_shadows(scene, points + 2e-3 * normal)
    normal = normal.astype(np.float32)
    d = d.astype(np.float32)
    light32 = light.astype(np.float32)
    key = np.maximum(_dot(light32, normal), 0.0) * ~shadowed  # [P] n . l
    fill = np.maximum(_dot(_fill_direction(light).astype(np.float32), normal), 0.0)
    sky = np.float32(0.55) + np.float32(0.45) * normal[2]  # hemisphere ambient: brighter facing up
    diffuse = np.where(metal, np.float32(0.35), np.float32(1.0))
    colour = albedo * (key * SUN[:, None] + (FILL * fill + AMBIENT * sky)) * diffuse

    half = light32[:, None] - d
    half /= np.sqrt((half * half).sum(0))
    n_dot_h = np.clip((normal * half).sum(0), 0.0, 1.0)
    shininess = np.where(metal, np.float32(80.0), np.float32(12.0))
    strength = np.where(metal, np.float32(1.6), np.float32(0.12)) * (key > 0)
    tint = np.where(metal, 0.5 + 0.5 * albedo, np.float32(1.0))
    colour += strength * n_dot_h**shininess * tint
    reflected_z = d[2] - 2 * (d * normal).sum(0) * normal[2]
    environment = np.where(reflected_z > 0, 0.25 + 0.35 * reflected_z, np.float32(0.08))  # sky above, floor below
    colour += (metal * np.float32(0.8) * environment) * (np.float32(0.2) + albedo)
    return colour


def shade_scene(scene: Scene, dirs: np.ndarray, depth: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Colour every pixel (linear light, then gamma): uint8 RGB ``[H, W, 3]``."""
    dirs32 = dirs.astype(np.float32)
    linear = shade_floor(scene, dirs32, floor_shadows(scene, dirs, depth, ids))  # [3, H, W]
    linear[:, ~np.isfinite(depth)] = SKY[:, None]
    objects = np.nonzero(ids)
    if len(objects[0]):
        linear[:, objects[0], objects[1]] = shade_objects(scene, dirs, depth, ids, objects)
    levels = (np.clip(linear, 0.0, 1.0) * np.float32(GAMMA_LEVELS - 1) + np.float32(0.5)).astype(np.int32)
    return np.take(GAMMA_TABLE, levels).transpose(1, 2, 0).copy()  # [H, W, 3]


# ---------------------------------------------------------------------------------------------------- one scene
def make_scene(seed: int, index: int, variant: str, height: int, width: int, shapes: tuple[str, ...],
               min_objects: int = MIN_OBJECTS,
               max_objects: int = MAX_OBJECTS) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Scene ``index`` of ``seed``: uint8 image ``[H, W, 3]``, uint8 ids ``[H, W]`` and its json description.

    ``min_objects..max_objects`` objects (CLEVR: 3-10; CLEVR6, the Slot Attention paper's subset: 3-6)."""
    layout_rng = np.random.default_rng([seed, index, 0])
    min_pixels = max(4, round(MIN_VISIBLE_FRACTION * height * width))
    for _attempt in range(MAX_LAYOUT_ATTEMPTS):
        layout = sample_layout(layout_rng, shapes, height, width, min_objects, max_objects)
        dirs = layout.camera.ray_directions()
        depth, ids = trace_primary(layout, dirs)
        visible = np.bincount(ids.ravel(), minlength=len(layout.objects) + 1)[1:]
        if visible.min() >= min_pixels:
            break
    else:
        raise RuntimeError(f"scene {index}: no layout with every object visible after {MAX_LAYOUT_ATTEMPTS} tries")
    scene = sample_appearance(np.random.default_rng([seed, index, 1]), layout, variant)
    image = shade_scene(scene, dirs, depth, ids)
    return image, ids, describe(scene, visible, variant)


def describe(scene: Scene, visible: np.ndarray, variant: str) -> dict[str, Any]:
    """The CLEVR(Tex)-style json record of a scene (object ``m`` is mask id ``m + 1``)."""
    cam = scene.camera
    centres = np.stack([obj.centre for obj in scene.objects])
    px, py, depth = cam.project(centres)
    objects = []
    for m, obj in enumerate(scene.objects):
        objects.append({
            "shape": obj.shape, "size": obj.size, "material": obj.material, "color": obj.color,
            "texture": obj.texture.kind if obj.texture is not None else "none",
            "rotation": round(obj.rotation, 4),
            "3d_coords": [round(float(c), 5) for c in obj.centre],
            "pixel_coords": [int(np.floor(px[m])), int(np.floor(py[m])), round(float(depth[m]), 4)],
            "visible_pixels": int(visible[m]), "mask_id": m + 1,
        })
    return {
        "ground_material": scene.floor_texture.kind if scene.floor_texture is not None else "plain",
        "objects": objects,
        "camera": {"position": [round(float(c), 5) for c in cam.position], "look_at": [0.0, 0.0, 0.0],
                   "fov_x_degrees": round(math.degrees(FOV_X), 4)},
        "light_direction": [round(float(c), 5) for c in scene.light],
        "variant": variant,
    }
