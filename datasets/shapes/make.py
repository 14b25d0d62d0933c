"""Recipe: procedural point-cloud shapes in a canonical orientation (regenerates datasets/shapes/shapes.npz).

12 classes, sampled uniformly (by area, approximately) on the surface or along the curve of: sphere, ellipsoid,
cube, cuboid, cylinder, cone, torus, helix, square pyramid, tetrahedron, disk and trefoil knot. Every shape is
generated in a canonical orientation (symmetry axis along z, faces normal to the axes, the pyramid's apex and
the cone's tip pointing to +z), centred at the origin and scaled to a unit-order size, so that models trained on
it can learn an orientation bias that geolie then measures. Per sample: random shape parameters within ranges,
between 256 and 1024 points, Gaussian noise of σ = 0.01-0.02. 40 samples per class; deterministic for the seed.

Stored as ``shapes.npz``: ``points`` (float32, all clouds concatenated), ``offsets`` (int64, start of each cloud,
plus the end), ``labels`` (int64), ``classes`` (names). ``manifest.json`` has the checksum and fixed splits.

    python datasets/shapes/make.py
"""
from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from _manifest import sha256, splits  # noqa: E402

SEED = 11
PER_CLASS = 40
FILE = "shapes.npz"


def _unit(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def sphere(rng, n):
    return _unit(rng, n) * rng.uniform(0.8, 1.2)


def ellipsoid(rng, n):
    axes = np.sort(rng.uniform(0.4, 1.2, 3))  # canonical: longest axis along z
    return _unit(rng, n) * axes


def _box_surface(rng, n, half):
    areas = np.array([half[1] * half[2], half[0] * half[2], half[0] * half[1]]) * 2
    face = rng.choice(6, n, p=np.repeat(areas, 2) / np.repeat(areas, 2).sum())
    p = rng.uniform(-1, 1, (n, 3)) * half
    axis, sign = face // 2, np.where(face % 2 == 0, 1.0, -1.0)
    p[np.arange(n), axis] = sign * half[axis]
    return p


def cube(rng, n):
    return _box_surface(rng, n, np.full(3, rng.uniform(0.6, 1.0)))


def cuboid(rng, n):
    return _box_surface(rng, n, np.sort(rng.uniform(0.3, 1.1, 3)))


def cylinder(rng, n):
    r, h = rng.uniform(0.3, 0.7), rng.uniform(0.8, 1.4)
    side = rng.rand(n) < (2 * np.pi * r * 2 * h) / (2 * np.pi * r * 2 * h + 2 * np.pi * r * r)
    t = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(side, r, r * np.sqrt(rng.rand(n)))
    z = np.where(side, rng.uniform(-h, h, n), np.where(rng.rand(n) < 0.5, h, -h))
    return np.stack([rad * np.cos(t), rad * np.sin(t), z], 1)


def cone(rng, n):
    r, h = rng.uniform(0.5, 0.9), rng.uniform(1.0, 1.6)
    slant = np.sqrt(r * r + h * h)
    side = rng.rand(n) < (np.pi * r * slant) / (np.pi * r * slant + np.pi * r * r)
    u = np.sqrt(rng.rand(n))  # area-uniform along the slant / the base disk
    t = rng.uniform(0, 2 * np.pi, n)
    rad = np.where(side, r * u, r * u)
    z = np.where(side, h * (1 - u), 0.0) - h / 3  # tip at +z; centroid of the solid near the origin
    return np.stack([rad * np.cos(t), rad * np.sin(t), z], 1)


def torus(rng, n):
    R, r = rng.uniform(0.7, 1.0), rng.uniform(0.15, 0.35)
    u, v = rng.uniform(0, 2 * np.pi, n), rng.uniform(0, 2 * np.pi, n)
    keep = rng.rand(n) < (R + r * np.cos(v)) / (R + r)  # area weighting by rejection, then refill
    while not keep.all():
        m = ~keep
        v[m] = rng.uniform(0, 2 * np.pi, m.sum())
        keep[m] = rng.rand(m.sum()) < (R + r * np.cos(v[m])) / (R + r)
    return np.stack([(R + r * np.cos(v)) * np.cos(u), (R + r * np.cos(v)) * np.sin(u), r * np.sin(v)], 1)


def helix(rng, n):
    r, turns, h = rng.uniform(0.4, 0.8), rng.uniform(2, 4), rng.uniform(1.0, 1.6)
    t = rng.uniform(0, 1, n)
    return np.stack([r * np.cos(2 * np.pi * turns * t), r * np.sin(2 * np.pi * turns * t), h * (2 * t - 1)], 1)


def _triangles(rng, n, tris):
    tris = np.asarray(tris, dtype=np.float64)
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    k = rng.choice(len(tris), n, p=areas / areas.sum())
    a, b = rng.rand(n, 1), rng.rand(n, 1)
    flip = (a + b) > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    t = tris[k]
    return t[:, 0] + a * (t[:, 1] - t[:, 0]) + b * (t[:, 2] - t[:, 0])


def pyramid(rng, n):
    s, h = rng.uniform(0.6, 1.0), rng.uniform(1.0, 1.6)
    base = [[-s, -s, 0], [s, -s, 0], [s, s, 0], [-s, s, 0]]
    apex = [0, 0, h]
    tris = [[base[0], base[1], base[2]], [base[0], base[2], base[3]]]
    tris += [[base[i], base[(i + 1) % 4], apex] for i in range(4)]
    return _triangles(rng, n, tris) - np.array([0, 0, h / 4])


def tetrahedron(rng, n):
    v = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=np.float64) * rng.uniform(0.5, 0.8)
    tris = [[v[0], v[1], v[2]], [v[0], v[1], v[3]], [v[0], v[2], v[3]], [v[1], v[2], v[3]]]
    return _triangles(rng, n, tris)


def disk(rng, n):
    r = rng.uniform(0.7, 1.2)
    rad, t = r * np.sqrt(rng.rand(n)), rng.uniform(0, 2 * np.pi, n)
    return np.stack([rad * np.cos(t), rad * np.sin(t), np.zeros(n)], 1)


def trefoil(rng, n):
    t = rng.uniform(0, 2 * np.pi, n)
    s = rng.uniform(0.25, 0.35)
    return s * np.stack([np.sin(t) + 2 * np.sin(2 * t), np.cos(t) - 2 * np.cos(2 * t), -np.sin(3 * t)], 1)


CLASSES = {f.__name__: f for f in (sphere, ellipsoid, cube, cuboid, cylinder, cone, torus, helix, pyramid,
                                   tetrahedron, disk, trefoil)}


def generate(seed: int = SEED, per_class: int = PER_CLASS):
    """Return ``points [P, 3] float32, offsets [S + 1], labels [S], class names``."""
    rng = np.random.RandomState(seed)
    clouds, labels = [], []
    for label, (name, fn) in enumerate(CLASSES.items()):
        for _ in range(per_class):
            n = int(rng.randint(256, 1025))
            p = fn(rng, n) + rng.normal(scale=rng.uniform(0.01, 0.02), size=(n, 3))
            clouds.append(p.astype(np.float32))
            labels.append(label)
    offsets = np.concatenate([[0], np.cumsum([len(c) for c in clouds])]).astype(np.int64)
    return np.concatenate(clouds), offsets, np.array(labels, dtype=np.int64), np.array(list(CLASSES))


def main():
    points, offsets, labels, classes = generate()
    path = os.path.join(HERE, FILE)
    np.savez_compressed(path, points=points, offsets=offsets, labels=labels, classes=classes)
    manifest = {
        "description": "procedural point clouds in a canonical orientation, 12 classes",
        "seed": SEED, "per_class": PER_CLASS, "classes": classes.tolist(), "points_per_cloud": [256, 1024],
        "noise_sigma": [0.01, 0.02],
        "versions": {"numpy": metadata.version("numpy"), "python": platform.python_version()},
        "files": {"all": {"file": FILE, "sha256": sha256(path), "samples": int(len(labels)),
                          "points": int(len(points)), "splits": splits(len(labels), SEED)}},
    }
    with open(os.path.join(HERE, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)


if __name__ == "__main__":
    main()
