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
