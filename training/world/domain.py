"""The synthetic world's domain: instances of shape classes in contexts, rendered exactly from a seed.

Usage::

    from training.world import domain as D
    inst = D.Instance("star", "red", "white dot")
    ctx = D.Context("striped", "left", "small", "outline")
    image, masks = D.render(D.Scene.single(inst, ctx), seed=7)     # (32, 32, 3) uint8, [(32, 32) bool]
    D.caption(inst, ctx)   # 'a red star with a white dot in small size on a striped background on the left in outline style'

An **instance** (the analogue of a DreamBench subject) is a shape class with a colour and a mark; a class has
``len(COLOURS) * len(MARKS)`` instances, and an instance is recognisable in any context by its colour and mark.
A **context** is what an instruction can change: background, position, size and style. Every attribute value
has a phrase in the instruction vocabulary (:data:`PHRASES`), so the build's prompt ``"a {class} {phrase}"``
reads naturally and the phrase maps back to the attribute it asks for (:func:`phrase_attribute`).

Rendering: everything is drawn at 4× resolution with PIL and box-downsampled to :data:`IMAGE_SIZE` (smooth
edges); small per-scene jitter (colour ±12, position ±1.5 px, radius ±10 %, rotation ±8°) comes from a
generator seeded by the scene seed only, so the same (scene, seed) gives the same bytes. Each object's mask is
its visible silhouette (later objects occlude earlier ones; shapes are sampled at pixel centres on the 4× grid,
so pixel counts estimate the analytic area without bias): a pixel is in the mask when at least half of its
4×4 high-resolution cell is covered by that object (a tie goes to the upper object).

Held-out pairs: an (instance, context) pair is held out of all generative training when a stable hash of the
pair falls below :data:`HELD_OUT_FRACTION`; :func:`is_held_out` decides it and the gates evaluate on them.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32
SCALE = 4  # drawn at IMAGE_SIZE * SCALE, box-downsampled
HELD_OUT_FRACTION = 0.15

CLASSES = ("circle", "square", "triangle", "star", "heart", "cross")
COLOURS = {
    "red": (215, 40, 40), "green": (40, 170, 60), "blue": (45, 85, 225),
    "yellow": (235, 205, 35), "purple": (145, 60, 195), "cyan": (40, 200, 215),
}
MARKS = ("none", "white dot", "black dot")
BACKGROUNDS = ("light gray", "dark gray", "striped", "checkered")
POSITIONS = ("left", "center", "right")
SIZES = ("small", "large")
STYLES = ("solid", "outline")

#: attribute → its values, in label order (the oracle's heads use these indices)
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "class": CLASSES, "colour": tuple(COLOURS), "mark": MARKS,
    "background": BACKGROUNDS, "position": POSITIONS, "size": SIZES, "style": STYLES,
}
IDENTITY_ATTRIBUTES = ("class", "colour", "mark")
CONTEXT_ATTRIBUTES = ("background", "position", "size", "style")

_BG_RGB = {"light gray": (200, 200, 200), "dark gray": (70, 70, 70)}
_STRIPES = ((205, 205, 205), (95, 95, 95))
_CHECKS = ((180, 180, 180), (110, 110, 110))
_MARK_RGB = {"white dot": (255, 255, 255), "black dot": (0, 0, 0)}
_X = {"left": 9.0, "center": 16.0, "right": 23.0}
_RADIUS = {"small": 5.5, "large": 8.5}

#: the context phrases of the instruction vocabulary: phrase → (attribute, value)
PHRASES: dict[str, tuple[str, str]] = {
    **{f"on a {b} background": ("background", b) for b in BACKGROUNDS},
    "on the left": ("position", "left"), "in the center": ("position", "center"),
    "on the right": ("position", "right"),
    **{f"in {s} size": ("size", s) for s in SIZES},
    **{f"in {s} style": ("style", s) for s in STYLES},
}
_PHRASE_OF = {v: k for k, v in PHRASES.items()}
#: every word a caption can use (the world tokenizer makes each one a single token)
VOCABULARY = tuple(sorted(
    {w for p in PHRASES for w in p.split()} | set(CLASSES) | set(COLOURS)
    | {"a", "with", "dot", "white", "black", "photo", "of", "and", "holder"}
))


@dataclass(frozen=True)
class Instance:
    cls: str
    colour: str
    mark: str

    def __post_init__(self):
        _check("class", self.cls)
        _check("colour", self.colour)
        _check("mark", self.mark)

    @property
    def id(self) -> str:
        return f"{self.colour}-{self.cls}-{self.mark.replace(' ', '')}"

    def phrase(self) -> str:
        """``"red star with a white dot"`` (no article)."""
        mark = "" if self.mark == "none" else f" with a {self.mark}"
        return f"{self.colour} {self.cls}{mark}"

    def labels(self) -> dict[str, str]:
        return {"class": self.cls, "colour": self.colour, "mark": self.mark}


@dataclass(frozen=True)
class Context:
    background: str
    position: str
    size: str
    style: str

    def __post_init__(self):
        for attr in CONTEXT_ATTRIBUTES:
            _check(attr, getattr(self, attr))

    @property
    def id(self) -> str:
        return f"{self.background}-{self.position}-{self.size}-{self.style}"

    def phrases(self) -> list[str]:
        return [_PHRASE_OF[(a, getattr(self, a))] for a in CONTEXT_ATTRIBUTES]

    def labels(self) -> dict[str, str]:
        return {a: getattr(self, a) for a in CONTEXT_ATTRIBUTES}


def _check(attr: str, value: str) -> None:
    if value not in ATTRIBUTES[attr]:
        raise ValueError(f"unknown {attr} {value!r}; allowed: {', '.join(ATTRIBUTES[attr])}")


def all_instances() -> list[Instance]:
    return [Instance(c, col, m) for c in CLASSES for col in COLOURS for m in MARKS]


def all_contexts() -> list[Context]:
    return [Context(*v) for v in itertools.product(BACKGROUNDS, POSITIONS, SIZES, STYLES)]


def instance_from_id(instance_id: str) -> Instance:
    colour, cls, mark = instance_id.split("-")
    return Instance(cls, colour, {"none": "none", "whitedot": "white dot", "blackdot": "black dot"}[mark])


def _u64(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "big")


def is_held_out(inst: Instance, ctx: Context, seed: int = 0) -> bool:
    """True when the (instance, context) pair is held out of every generative model's training."""
    return _u64("held-out", seed, inst.id, ctx.id) / 2**64 < HELD_OUT_FRACTION


def phrase_attribute(phrase: str) -> tuple[str, str]:
    """The (attribute, value) an instruction phrase asks for; ``KeyError`` for a phrase outside the world."""
    return PHRASES[" ".join(phrase.split())]


# ------------------------------------------------------------------------------------------ captions


def caption(inst: Instance, ctx: Context | None = None, *, drop: frozenset[str] = frozenset(),
            order: list[int] | None = None, photo: bool = False) -> str:
    """The project's prompt phrasing: ``"a {colour} {class} {mark} {context phrases}"``.

    ``drop`` names attributes left out (``"colour"``, ``"mark"`` or a context attribute; the class is always
    said); ``order`` permutes the context phrases (training shuffles them so that any phrase may follow the
    class, as in the build's ``"a {class} {phrase}"``); ``photo`` prefixes ``"a photo of"``.
    """
    words = ["a photo of a" if photo else "a"]
    if "colour" not in drop:
        words.append(inst.colour)
    words.append(inst.cls)
    if "mark" not in drop and inst.mark != "none":
        words.append(f"with a {inst.mark}")
    if ctx is not None:
        phrases = [p for a, p in zip(CONTEXT_ATTRIBUTES, ctx.phrases()) if a not in drop]
        if order is not None:
            phrases = [phrases[i] for i in order if i < len(phrases)]
        words += phrases
    return " ".join(words)


def training_caption(inst: Instance, ctx: Context, rng: random.Random, p_drop: float = 0.2) -> str:
    """A caption with each optional attribute dropped with ``p_drop`` and the context phrases shuffled."""
    drop = frozenset(a for a in ("colour", "mark", *CONTEXT_ATTRIBUTES) if rng.random() < p_drop)
    order = list(range(4))
    rng.shuffle(order)
    return caption(inst, ctx, drop=drop, order=order, photo=rng.random() < 0.2)


# ------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class SceneObject:
    instance: Instance
    position: str
    size: str
    style: str


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...] = field(default_factory=tuple)

    @classmethod
    def single(cls, inst: Instance, ctx: Context) -> "Scene":
        return cls(ctx.background, (SceneObject(inst, ctx.position, ctx.size, ctx.style),))

    def __post_init__(self):
        _check("background", self.background)
        if not 1 <= len(self.objects) <= 3:
            raise ValueError(f"a scene holds 1 to 3 objects, got {len(self.objects)}")


def _shape_polygon(cls: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Vertices (high-resolution pixels) of a class's outline; None for the circle (drawn as an ellipse)."""
    if cls == "circle":
        return None
    if cls == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(0.82 * x, 0.82 * y) for x, y in pts]
    elif cls == "triangle":
        pts = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
        pts = [(x, y + 0.12) for x, y in pts]
    elif cls == "star":
        pts = []
        for k in range(10):
            rad = 1.0 if k % 2 == 0 else 0.52
            a = math.radians(-90 + 36 * k)
            pts.append((rad * math.cos(a), rad * math.sin(a) + 0.05))
    elif cls == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((x / 17.0, -(y + 2.5) / 17.0))
    elif cls == "cross":
        w = 0.34
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
               (-1, -w), (-w, -w)]
    else:
        raise ValueError(f"unknown class {cls!r}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def _inside_polygon(poly: list[tuple[float, float]], size: int) -> np.ndarray:
    """Pixel-centre sampling of a polygon (even-odd rule): a pixel is in when its centre is inside, so the
    count of pixels is an unbiased estimate of the polygon's area."""
    yy, xx = _grid(size)
    inside = np.zeros((size, size), bool)
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        if y0 == y1:
            continue
        crosses = (yy >= min(y0, y1)) & (yy < max(y0, y1))
        x_at = x0 + (yy - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (xx < x_at)
    return inside


def _silhouette(cls: str, cx: float, cy: float, r: float, rot: float, size: int,
                line: int = 0) -> np.ndarray:
    """The filled shape (pixel centres inside it); with ``line`` > 0, its boundary drawn ``line`` pixels wide."""
    poly = _shape_polygon(cls, cx, cy, r, rot)
    if not line:
        return _disc(cx, cy, r, size) if poly is None else _inside_polygon(poly, size)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=255, width=line)
    else:
        draw.line(poly + poly[:2], fill=255, width=line, joint="curve")
    return np.asarray(canvas) > 127


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    return yy + 0.5, xx + 0.5


def _disc(cx: float, cy: float, r: float, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


@functools.lru_cache(maxsize=8)
def _background_cached(name: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    if name == "striped":  # horizontal bands 4 px high: coarse enough for the 4×-downsampling VAE
        band = (yy // (4 * SCALE)) % 2 == 0
        bg = np.where(band[..., None], np.array(_STRIPES[0], np.float32), np.array(_STRIPES[1], np.float32))
    elif name == "checkered":
        cell = 8 * SCALE
        band = ((xx // cell) + (yy // cell)) % 2 == 0
        bg = np.where(band[..., None], np.array(_CHECKS[0], np.float32), np.array(_CHECKS[1], np.float32))
    else:
        bg = np.broadcast_to(np.array(_BG_RGB[name], np.float32), (size, size, 3)).copy()
    bg.setflags(write=False)
    return bg


def _background(name: str, size: int) -> np.ndarray:
    return _background_cached(name, size).copy()


@dataclass(frozen=True)
class Placement:
    """Where an object is drawn, in output pixels: centre, radius, rotation (radians) and RGB colour."""
    cx: float
    cy: float
    r: float
    rot: float
    rgb: tuple[float, float, float]


def layout(scene: Scene, seed: int) -> list[Placement]:
    """The jittered placement of every object of ``scene`` (what :func:`render` draws)."""
    rng = np.random.default_rng(_u64("scene", seed))
    out = []
    for obj in scene.objects:
        r = _RADIUS[obj.size] * rng.uniform(0.9, 1.1)
        cx = _X[obj.position] + rng.uniform(-1.5, 1.5)
        cy = 16.0 + rng.uniform(-1.5, 1.5)
        rot = math.radians(rng.uniform(-8, 8))
        rgb = np.clip(np.array(COLOURS[obj.instance.colour], np.float32) + rng.uniform(-12, 12, 3), 0, 255)
        out.append(Placement(cx, cy, r, rot, tuple(float(v) for v in rgb)))
    return out


def render(scene: Scene, seed: int, coverage: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Render ``scene`` → ((H, W, 3) uint8 image, one (H, W) bool visible-silhouette mask per object).

    With ``coverage`` the masks are the fraction of each pixel the object covers (float, 0–1) instead.
    """
    hi = IMAGE_SIZE * SCALE
    canvas = _background(scene.background, hi)
    silhouettes = []
    for obj, pl in zip(scene.objects, layout(scene, seed)):
        r, cx, cy, rot = pl.r * SCALE, pl.cx * SCALE, pl.cy * SCALE, pl.rot
        rgb = np.array(pl.rgb, np.float32)
        sil = _silhouette(obj.instance.cls, cx, cy, r, rot, hi)
        if obj.style == "outline":
            width = max(1.0, 0.17 * r / SCALE) * SCALE
            # the boundary drawn twice the band's width, kept inside the silhouette: a band `width` deep
            paint = sil & _silhouette(obj.instance.cls, cx, cy, r, rot, hi, line=2 * int(round(width)))
        else:
            paint = sil
        canvas[paint] = rgb
        if obj.instance.mark != "none":
            dot_r = 0.33 * r
            canvas[_disc(cx, cy, dot_r, hi)] = np.array(_MARK_RGB[obj.instance.mark], np.float32)
        silhouettes.append(sil)
    image = canvas.reshape(IMAGE_SIZE, SCALE, IMAGE_SIZE, SCALE, 3).mean(axis=(1, 3))
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    covers = []
    for i, sil in enumerate(silhouettes):
        visible = sil.copy()
        for later in silhouettes[i + 1:]:
            visible &= ~later
        covers.append(visible.reshape(IMAGE_SIZE, SCALE, IMAGE_SIZE, SCALE).mean(axis=(1, 3)))
    if coverage:
        return image, covers
    # a pixel belongs to the object covering most of it (the upper one on a tie), if that is at least half
    stack = np.stack(covers)
    owner = len(covers) - 1 - np.argmax(stack[::-1], axis=0)
    return image, [(owner == i) & (c >= 0.5) for i, c in enumerate(covers)]


def shape_area(cls: str, r: float) -> float:
    """Analytic area (output pixels²) of a class's silhouette of radius ``r`` (rotation does not change it)."""
    if cls == "circle":
        return math.pi * r * r
    pts = _shape_polygon(cls, 0.0, 0.0, r, 0.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))


def domain_fingerprint() -> str:
    """A hash of what the domain *produces* (probe renders and masks, captions, vocabulary, splits), so that
    editing this module's text or structure without changing its output does not invalidate a trained world."""
    h = hashlib.sha256()
    pairs = sample_pairs(48, 12345, "all")
    images, labels = render_pairs(pairs, 12345)
    h.update(images.tobytes())
    for k in range(8):
        h.update(np.stack(render(random_multi_scene(k), k)[1]).tobytes())
    rng = random.Random(0)
    h.update("\n".join([caption(i, c) for i, c in pairs] + [training_caption(i, c, rng) for i, c in pairs]).encode())
    h.update(repr((ATTRIBUTES, PHRASES, VOCABULARY, HELD_OUT_FRACTION, IMAGE_SIZE)).encode())
    h.update(bytes(is_held_out(i, c) for i in all_instances() for c in all_contexts()))
    return h.hexdigest()[:16]


def scene_caption(scene: Scene) -> str:
    """Caption of a multi-object scene: ``"a red star on the left and a small blue circle on the right on a
    light gray background"`` (objects in order, each with its position, size and style phrase)."""
    parts = []
    for obj in scene.objects:
        parts.append(f"a {obj.instance.phrase()} in {obj.size} size {_PHRASE_OF[('position', obj.position)]}"
                     f" in {obj.style} style")
    return " and ".join(parts) + f" on a {scene.background} background"


def random_multi_scene(seed: int) -> Scene:
    """A scene of 2–3 small objects at distinct positions, on one background, fully determined by ``seed``."""
    rng = random.Random(_u64("multi", seed))
    n = rng.choice((2, 3))
    positions = sorted(rng.sample(POSITIONS, n), key=POSITIONS.index)
    insts = all_instances()
    objs = tuple(SceneObject(rng.choice(insts), p, "small", rng.choice(STYLES)) for p in positions)
    return Scene(rng.choice(BACKGROUNDS), objs)


def sample_pairs(n: int, seed: int, split: str = "train", held_out_seed: int = 0) -> list[tuple[Instance, Context]]:
    """``n`` (instance, context) pairs drawn uniformly from ``split`` (``train``, ``held_out`` or ``all``)."""
    rng = random.Random(_u64("pairs", seed, split))
    insts, ctxs = all_instances(), all_contexts()
    out = []
    while len(out) < n:
        inst, ctx = rng.choice(insts), rng.choice(ctxs)
        held = is_held_out(inst, ctx, held_out_seed)
        if split == "all" or (split == "held_out") == held:
            out.append((inst, ctx))
    return out


def labels_of(inst: Instance, ctx: Context) -> dict[str, int]:
    """Attribute → label index (the oracle's targets)."""
    values = {**inst.labels(), **ctx.labels()}
    return {a: ATTRIBUTES[a].index(values[a]) for a in ATTRIBUTES}


def render_pairs(pairs: list[tuple[Instance, Context]], seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render single-object scenes → ((N, H, W, 3) uint8, attribute → (N,) int64 labels)."""
    images = np.empty((len(pairs), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    labels = {a: np.empty(len(pairs), np.int64) for a in ATTRIBUTES}
    for i, (inst, ctx) in enumerate(pairs):
        images[i] = render(Scene.single(inst, ctx), _u64("render", seed, i) % 2**63)[0]
        for a, v in labels_of(inst, ctx).items():
            labels[a][i] = v
    return images, labels
