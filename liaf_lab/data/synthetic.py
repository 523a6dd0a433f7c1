"""Procedural shape scenes on real photographs, in COCO format, deterministic by seed.

Five classes differ in shape, colour and texture: red shaded ``disc``, blue checkered ``square``, yellow
striped ``triangle``, green speckled ``ring`` and magenta gradient ``cross``. Each image holds 1-6 of them
on a random crop of a photograph bundled with scikit-image, plus 0-3 unlabeled distractors (irregular
blobs and thin bars in muted colours). Instances differ in difficulty: size (at 160 px: 12% tiny 5-15 px,
76% typical 15-80 px, 12% huge 80-152 px, each log-uniform; sizes scale with the image), contrast (hue,
saturation and value jitter, 30% semi-transparent, real backgrounds with similar colours), occlusion
(later layers are drawn over earlier ones; truncation at the border counts too) and blur (40% Gaussian
blurred). Instances less than :data:`MIN_VISIBLE` visible stay in the file with ``iscrowd = 1``, so the
loaders turn them into ignore regions and COCOeval neither rewards nor penalises detections on them.

Every annotation also records ``visible`` (visible fraction of the object's area), ``contrast`` (opacity
times the RGB distance between object and background under it, in [0, 1]) and ``blur`` (sigma, pixels).
Boxes cover the whole object (amodal), clipped to the image. Image ``i`` of a split depends only on
``(seed, split, i)``, so a longer run starts with the images of a shorter one.

CLI: ``python -m liaf_lab.data.synthetic --out data_samples/shapes --train 160 --val 48 --size 160 --seed 0``
"""

from __future__ import annotations

import argparse
import colorsys
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import skimage.data
from numpy.typing import NDArray
from PIL import Image
from skimage.filters import gaussian

SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross")
MIN_VISIBLE = 0.3
# photographs that ship inside scikit-image (the others need a download)
BACKGROUNDS = (
    "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "grass", "gravel", "brick", "camera", "moon", "coins", "clock",
)
_STYLE = {  # class -> (hue in degrees, texture)
    "disc": (0.0, "shaded"), "square": (220.0, "checker"), "triangle": (55.0, "stripes"),
    "ring": (120.0, "noise"), "cross": (290.0, "gradient"),
}
_SIZE_BINS = ((0.12, 5.0, 15.0), (0.88, 15.0, 80.0), (1.0, 80.0, 152.0))  # (cumulative p, lo, hi) at 160 px
_SS = 2  # supersampling per axis for anti-aliased coverage
_JPEG_QUALITY = 90

FloatArray = NDArray[np.float32]


@dataclass
class _Layer:
    """One drawn shape: a patch of the canvas whose top-left pixel is ``(x0, y0)`` (may lie outside)."""

    x0: int
    y0: int
    coverage: FloatArray  # [ph, pw] sharp coverage in [0, 1]
    fine: NDArray[np.bool_]  # [ph * _SS, pw * _SS] inside mask on the supersampling grid
    color: FloatArray  # [ph, pw, 3] RGB in [0, 1]
    opacity: float
    blur: float


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[NDArray[np.uint8], ...]:
    """The :data:`BACKGROUNDS` photographs as RGB ``[h, w, 3]`` uint8, longer side at most 512."""
    out = []
    for name in BACKGROUNDS:
        im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        im.thumbnail((512, 512))
        out.append(np.asarray(im))
    return tuple(out)


def _background(rng: np.random.Generator, height: int, width: int) -> FloatArray:
    """A random crop of a random photograph, resized to ``[height, width, 3]``, jittered in brightness."""
    photo = _backgrounds()[rng.integers(len(BACKGROUNDS))]
    ph, pw = photo.shape[:2]
    ch = max(8, int(min(ph, pw * height / width) * rng.uniform(0.3, 1.0)))
    cw = max(8, min(pw, round(ch * width / height)))
    y, x = rng.integers(0, ph - ch + 1), rng.integers(0, pw - cw + 1)
    crop = Image.fromarray(photo[y:y + ch, x:x + cw]).resize((width, height), Image.Resampling.BILINEAR)
    img = np.asarray(crop, dtype=np.float32) / 255
    if rng.random() < 0.5:
        img = img[:, ::-1]
    mean = img.mean()
    return np.clip((img - mean) * rng.uniform(0.6, 1.1) + mean * rng.uniform(0.8, 1.15), 0, 1)


def _object_size(rng: np.random.Generator, scale: float) -> float:
    """Longer side in pixels: a mixture of log-uniform bins (:data:`_SIZE_BINS`) times ``scale``."""
    u = rng.random()
    _, lo, hi = next(b for b in _SIZE_BINS if u < b[0])
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) * scale


def _inside(kind: str, u: FloatArray, v: FloatArray, params: NDArray[np.float64]) -> NDArray[np.bool_]:
    """Membership of local coordinates ``(u, v)`` (the shape spans [-1, 1] on both axes).

    ``params``: ring inner radius or cross arm half-width ``[1]``; blob harmonic amplitudes and phases ``[6]``.
    """
    if kind == "disc":
        return u * u + v * v <= 1
    if kind == "ring":
        r2 = u * u + v * v
        return (r2 <= 1) & (r2 >= params[0] ** 2)
    if kind in ("square", "bar"):
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if kind == "triangle":
        return (v <= 1) & (np.abs(u) <= (v + 1) / 2)
    if kind == "cross":
        return ((np.abs(u) <= params[0]) | (np.abs(v) <= params[0])) & (np.abs(u) <= 1) & (np.abs(v) <= 1)
    # "blob": star-convex outline r(phi) = 1 + sum_k a_k cos(k phi + p_k), scaled to fit the unit disc
    phi, edge = np.arctan2(v, u), np.ones_like(u)
    for k, a, p in zip((2, 3, 5), params[:3], params[3:], strict=True):
        edge += a * np.cos(k * phi + p)
    return np.hypot(u, v) <= edge / (1 + params[:3].sum())


def _texture(texture: str, base: FloatArray, u: FloatArray, v: FloatArray, rng: np.random.Generator) -> FloatArray:
    """Colour field ``[ph, pw, 3]`` of one shape from its ``base`` RGB and local pixel-centre coordinates."""
    if texture == "shaded":
        shade = 0.7 + 0.3 * np.clip(1 - (u * u + v * v), 0, 1)
    elif texture == "checker":
        n = rng.integers(3, 5)
        shade = 1 - 0.5 * ((np.floor((u + 1) * n / 2) + np.floor((v + 1) * n / 2)) % 2)
    elif texture == "stripes":
        light = np.floor((u + 1) * rng.uniform(1.5, 2.5)) % 2
        return (base + (1 - base) * 0.55 * light[..., None]).astype(np.float32)
    elif texture == "noise":
        shade = 0.5 + 0.5 * rng.random(u.shape)
    elif texture == "gradient":
        shade = 0.4 + 0.6 * np.clip((v + 1) / 2, 0, 1)
    else:  # "solid"
        shade = np.ones_like(u)
    return (base * shade[..., None]).astype(np.float32)


def _render(
    kind: str, texture: str, base: FloatArray, center: tuple[float, float], half: tuple[float, float],
    angle: float, params: NDArray[np.float64], opacity: float, blur: float, rng: np.random.Generator,
) -> _Layer:
    """Rasterise one shape with half-axes ``half`` rotated by ``angle`` around ``center`` (pixels)."""
    cx, cy = center
    reach = np.hypot(*half) + np.ceil(3 * blur) + 1
    x0, y0 = int(np.floor(cx - reach)), int(np.floor(cy - reach))
    pw, ph = int(np.ceil(cx + reach)) - x0, int(np.ceil(cy + reach)) - y0
    xs = x0 + (np.arange(pw * _SS, dtype=np.float32) + 0.5) / _SS - cx
    ys = y0 + (np.arange(ph * _SS, dtype=np.float32) + 0.5) / _SS - cy
    c, s = np.cos(angle), np.sin(angle)
    u = (c * xs[None, :] + s * ys[:, None]) / half[0]
    v = (-s * xs[None, :] + c * ys[:, None]) / half[1]
    fine = _inside(kind, u, v, params)
    coverage = fine.reshape(ph, _SS, pw, _SS).mean(axis=(1, 3), dtype=np.float32)
    u_px, v_px = (a.reshape(ph, _SS, pw, _SS).mean(axis=(1, 3)) for a in (u, v))
    return _Layer(x0, y0, coverage, fine, _texture(texture, base, u_px, v_px, rng), opacity, blur)


def _hsv(hue_deg: float, s: float, v: float) -> FloatArray:
    return np.asarray(colorsys.hsv_to_rgb((hue_deg % 360) / 360, s, v), dtype=np.float32)


def _object_layer(rng: np.random.Generator, cls: str, height: int, width: int) -> _Layer:
    """A labeled shape of class ``cls`` with random size, pose, colour jitter, opacity and blur."""
    size = _object_size(rng, min(height, width) / 160)
    hue, texture = _STYLE[cls]
    base = _hsv(hue + rng.uniform(-10, 10), rng.uniform(0.65, 1.0), rng.uniform(0.6, 1.0))
    long_half, short_half = size / 2, size / 2 / rng.uniform(1.0, 1.35)
    half = (long_half, short_half) if rng.random() < 0.5 else (short_half, long_half)
    params = np.array([rng.uniform(0.45, 0.65) if cls == "ring" else rng.uniform(0.28, 0.4)])
    opacity = 1.0 if rng.random() < 0.7 else rng.uniform(0.45, 0.9)
    blur = 0.0 if rng.random() < 0.6 else rng.uniform(0.4, 1.8)
    center = (rng.uniform(0, width), rng.uniform(0, height))
    return _render(cls, texture, base, center, half, rng.uniform(0, np.pi), params, opacity, blur, rng)


def _distractor_layer(rng: np.random.Generator, height: int, width: int) -> _Layer:
    """An unlabeled irregular blob or thin bar in a muted colour."""
    scale = min(height, width) / 160
    base = _hsv(rng.uniform(0, 360), rng.uniform(0, 0.5), rng.uniform(0.15, 0.95))
    texture = "solid" if rng.random() < 0.5 else "noise"
    center = (rng.uniform(0, width), rng.uniform(0, height))
    if rng.random() < 0.5:
        size = float(np.exp(rng.uniform(np.log(8), np.log(60)))) * scale / 2
        half, kind = (size, size * rng.uniform(0.6, 1.0)), "blob"
        params = np.concatenate([rng.uniform(0.1, 0.3, 3), rng.uniform(0, 2 * np.pi, 3)])
    else:
        half, kind = (rng.uniform(10, 50) * scale, rng.uniform(0.8, 2.0) * scale), "bar"
        params = np.zeros(0)
    opacity = rng.uniform(0.6, 1.0)
    return _render(kind, texture, base, center, half, rng.uniform(0, np.pi), params, opacity, 0.0, rng)


def _window(layer: _Layer, height: int, width: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(canvas slices, patch slices)`` of the part of ``layer`` that lies inside the canvas."""
    ph, pw = layer.coverage.shape
    cy0, cx0 = max(layer.y0, 0), max(layer.x0, 0)
    cy1, cx1 = min(layer.y0 + ph, height), min(layer.x0 + pw, width)
    canvas = (slice(cy0, cy1), slice(cx0, cx1))
    return canvas, (slice(cy0 - layer.y0, cy1 - layer.y0), slice(cx0 - layer.x0, cx1 - layer.x0))


def _composite(canvas: FloatArray, layer: _Layer) -> None:
    """Alpha-blend ``layer`` (blurred with premultiplied colour) onto ``canvas [H, W, 3]`` in place."""
    alpha, premult = layer.coverage, layer.color * layer.coverage[..., None]
    if layer.blur > 0:
        alpha = gaussian(alpha, sigma=layer.blur, mode="constant", preserve_range=True)
        premult = gaussian(premult, sigma=layer.blur, mode="constant", preserve_range=True, channel_axis=-1)
    dst, src = _window(layer, *canvas.shape[:2])
    a = layer.opacity * alpha[src][..., None]
    canvas[dst] = canvas[dst] * (1 - a) + layer.opacity * premult[src]


def _amodal_box(layer: _Layer, height: int, width: int) -> list[float]:
    """``[x1, y1, x2, y2]`` of the whole shape (supersampling precision), clipped to the image."""
    cols, rows = np.flatnonzero(layer.fine.any(axis=0)), np.flatnonzero(layer.fine.any(axis=1))
    x1, x2 = layer.x0 + cols[0] / _SS, layer.x0 + (cols[-1] + 1) / _SS
    y1, y2 = layer.y0 + rows[0] / _SS, layer.y0 + (rows[-1] + 1) / _SS
    return [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


def _scene(rng: np.random.Generator, height: int, width: int) -> tuple[NDArray[np.uint8], list[dict[str, Any]]]:
    """One image ``[H, W, 3]`` uint8 and its instances (class, box, visible, contrast, blur), in draw order."""
    canvas = _background(rng, height, width)
    classes = rng.integers(len(SHAPE_CLASSES), size=rng.integers(1, 7))
    items = [int(c) for c in classes] + [-1] * int(rng.integers(0, 4))  # -1: distractor
    order = rng.permutation(len(items))
    instances: list[dict[str, Any]] = []
    visible_maps: list[FloatArray] = []  # per instance [H, W]: its coverage not yet covered by later layers
    totals: list[float] = []  # per instance: coverage of the whole shape, inside the image or not
    for idx in order:
        cls = items[idx]
        if cls < 0:
            layer = _distractor_layer(rng, height, width)
        else:
            layer = _object_layer(rng, SHAPE_CLASSES[cls], height, width)
        dst, src = _window(layer, height, width)
        occluder = layer.opacity * layer.coverage[src]
        for vis in visible_maps:
            vis[dst] *= 1 - occluder
        if cls >= 0:
            cov = layer.coverage[src]
            under = (canvas[dst] * cov[..., None]).sum((0, 1)) / cov.sum()
            own = (layer.color[src] * cov[..., None]).sum((0, 1)) / cov.sum()
            vis = np.zeros((height, width), dtype=np.float32)
            vis[dst] = cov
            visible_maps.append(vis)
            totals.append(float(layer.coverage.sum()))
            instances.append({
                "cls": cls, "box": _amodal_box(layer, height, width),
                "contrast": float(layer.opacity * np.linalg.norm(own - under) / np.sqrt(3)), "blur": layer.blur,
            })
        _composite(canvas, layer)
    for inst, vis, total in zip(instances, visible_maps, totals, strict=True):
        inst["visible"] = float(vis.sum()) / total
    canvas += rng.normal(0, rng.uniform(0, 0.03), canvas.shape).astype(np.float32)
    return (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8), instances


def generate_scenes(
    out_dir: str | Path, num_images: int, image_size: tuple[int, int] = (160, 160), seed: int = 0,
    split: str = "train",
) -> Path:
    """Write ``num_images`` scenes as ``out_dir/<split>/<id:06d>.jpg`` plus COCO ``annotations/instances_<split>.json``.

    Args:
        image_size: ``(height, width)`` in pixels.
        seed: non-negative; image ``i`` depends only on ``(seed, split, i)``.

    Returns:
        The path of the annotation JSON.
    """
    height, width = image_size
    if num_images < 0 or height < 32 or width < 32 or seed < 0:
        raise ValueError(f"need num_images >= 0, image_size >= (32, 32) and seed >= 0, got {num_images}, "
                         f"{image_size}, {seed}")
    out_dir = Path(out_dir)
    image_dir, ann_dir = out_dir / split, out_dir / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng([seed, zlib.crc32(split.encode()), i])
        pixels, instances = _scene(rng, height, width)
        image_id, file_name = i + 1, f"{i + 1:06d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=_JPEG_QUALITY)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for inst in instances:
            x1, y1, x2, y2 = inst["box"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": inst["cls"] + 1,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": int(inst["visible"] < MIN_VISIBLE),
                "visible": round(inst["visible"], 3), "contrast": round(inst["contrast"], 3),
                "blur": round(inst["blur"], 2),
            })
    data = {
        "info": {"description": "liaf_lab procedural shapes", "version": "1", "seed": seed, "split": split,
                 "image_size": [height, width], "min_visible": MIN_VISIBLE},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(SHAPE_CLASSES)],
    }
    ann_file = ann_dir / f"instances_{split}.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def make_sample(
    out_dir: str | Path, num_train: int = 160, num_val: int = 48, image_size: tuple[int, int] = (160, 160),
    seed: int = 0,
) -> dict[str, Path]:
    """Write the ``train`` and ``val`` splits under ``out_dir``; returns ``{split: annotation JSON}``."""
    return {split: generate_scenes(out_dir, n, image_size, seed, split)
            for split, n in (("train", num_train), ("val", num_val))}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: generate the train/val sample and print a one-line summary."""
    p = argparse.ArgumentParser(prog="python -m liaf_lab.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data_samples/shapes", help="output folder (default: %(default)s)")
    p.add_argument("--train", type=int, default=160, help="number of train images (default: %(default)s)")
    p.add_argument("--val", type=int, default=48, help="number of val images (default: %(default)s)")
    p.add_argument("--size", type=int, default=160, help="square image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    paths = make_sample(args.out, args.train, args.val, (args.size, args.size), args.seed)
    for split, path in paths.items():
        anns = json.loads(path.read_text())["annotations"]
        ignored = sum(a["iscrowd"] for a in anns)
        print(f"{split}: {len(anns) - ignored} instances + {ignored} ignore regions -> {path}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
