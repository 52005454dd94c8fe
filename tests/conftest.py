import pytest
import torch

import fgd  # noqa: F401  (registers torch.ops.fgd.*)

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not fgd.cuda_compiled(),
    reason="needs a CUDA device and fgd built with its CUDA kernels",
)


@pytest.fixture
def gen(request):
    """A generator seeded from the test's name: fresh inputs per test, reproducible per run."""
    import zlib

    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


def shapes_splits(root, train: int, val: int) -> dict:
    """A train and a val split of the synthetic shapes data at 64 px, as `fgd train`'s flags name them."""
    from fgd.data import make_shapes_dataset

    tj, ti = make_shapes_dataset(root, train, image_size=64, seed=0, split="train")
    vj, vi = make_shapes_dataset(root, val, image_size=64, seed=0, split="val")
    return dict(train_json=tj, train_images=ti, val_json=vj, val_images=vi)
