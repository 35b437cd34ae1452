"""Builders shared by the tests (not fixtures: plain functions)."""
import numpy as np

from gait_ref.backend import to_device
from gait_ref.init import init_layer


def init_well_conditioned(layer, rng, xp, dtype=np.float64, skew=0.3):
    """Orthogonal plus a random perturbation: invertible, well conditioned, not orthogonal
    (so an inverse that silently became a transpose fails the tests)."""
    init_layer(layer, rng, "orthogonal", xp, dtype)
    shape = layer.weight_shape
    W = np.asarray(layer.params["W"].get() if hasattr(layer.params["W"], "get") else layer.params["W"])
    W = W + skew * rng.standard_normal(shape) / np.sqrt(shape[-2])
    layer.params["W"] = to_device(W.astype(dtype), xp)
    layer.params["b"] = to_device(rng.standard_normal(layer.params["b"].shape).astype(dtype), xp)


def rand(rng, shape, xp, dtype=np.float64):
    return to_device(rng.standard_normal(shape).astype(dtype), xp)


def make_shards(root, n_train=64, n_val=32, size=8, channels=3, n_classes=10, per_shard=16, seed=0):
    """A packed data set of random images in gait_ref's shard format (manifest and all).
    Returns {split: (images NHWC, labels)}."""
    from pathlib import Path

    from gait_ref.data.shards import FORMAT, VERSION, write_manifest, write_shard
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits, data = {}, {}
    for split, n in (("train", n_train), ("val", n_val)):
        x = rng.integers(0, 256, (n, size, size, channels)).astype(np.uint8)
        y = rng.integers(0, n_classes, n)
        data[split] = (x, y)
        splits[split] = [write_shard(root / f"{split}-{i // per_shard:05d}.h5", x[i:i + per_shard], y[i:i + per_shard])
                         for i in range(0, n, per_shard)]
    write_manifest(root, {"format": FORMAT, "version": VERSION, "layout": "NHWC",
                          "image_shape": [size, size, channels],
                          "classes": [[f"n{i:08d}", f"class {i}"] for i in range(n_classes)], "splits": splits})
    return data
