"""Real images for the image families (flows, CNNs): Fashion-MNIST from Debian's package.

`dataset-fashion-mnist` ships the four idx files of Xiao et al. (arXiv 1708.07747): 60,000
training and 10,000 test images of 28x28 grey pixels in ten classes. The package is fetched once
(assets.fetch_deb, checksummed) and decoded into `images/fashion-mnist-<sha[:16]>/*.npy` under the
asset cache, so later loads are one `np.load` each.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from accelc import assets
from accelc.errors import AccelcError
from accelc.fileutil import sha256_file

FASHION_MNIST_DEB = assets.DebFile(
    package="dataset-fashion-mnist",
    version="0.0~git20200523.55506a9-1",
    filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
_IDX_DTYPES = {0x08: np.uint8}


def parse_idx(raw: bytes, what: str) -> np.ndarray:
    """An idx array (LeCun's format: zero, zero, dtype code, rank, big-endian sizes, data)."""
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise AccelcError(f"{what}: not an idx file of unsigned bytes")
    rank = raw[3]
    header = 4 + 4 * rank
    shape = struct.unpack(f">{rank}I", raw[4:header])
    data = np.frombuffer(raw, dtype=_IDX_DTYPES[raw[2]], offset=header)
    if data.size != int(np.prod(shape)):
        raise AccelcError(f"{what}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def fashion_mnist_dir() -> Path:
    """The decoded data set: `{train,test}_{images,labels}.npy` (uint8; images N x 28 x 28)."""
    deb = assets.fetch_deb(FASHION_MNIST_DEB)
    final = assets.cache_dir("images") / f"fashion-mnist-{assets.key(sha256_file(deb))}"
    if all((final / f"{name}.npy").exists() for name in _IDX_FILES):
        return final
    members = assets.deb_members(deb, tuple(_IDX_FILES.values()))
    tmp = assets.temp_sibling_dir(final)
    for name, member in _IDX_FILES.items():
        np.save(tmp / f"{name}.npy", parse_idx(gzip.decompress(members[member]), member))
    return assets.publish_dir(tmp, final)


def fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x 28 x 28, labels uint8 N) of the `train` or `test` split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    root = fashion_mnist_dir()
    return np.load(root / f"{split}_images.npy"), np.load(root / f"{split}_labels.npy")
