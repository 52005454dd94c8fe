"""fgd: distil object detectors by fine-grained feature imitation (Wang et al., CVPR 2019)."""
import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.fgd.*)
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        f"fgd's compiled extension (fgd._C) could not be loaded with torch {torch.__version__}: {e}\n"
        "It is built against one torch version; after installing another torch, rebuild it with\n"
        "    pip install --no-build-isolation --force-reinstall --no-deps .\n"
        "from the fgd source tree (see the README's install section)."
    ) from e

from . import ops, reference  # noqa: E402
from .ops import box_iou, imitation_loss, imitation_mask  # noqa: E402
from .distill import Distiller  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "reference", "box_iou", "imitation_mask", "imitation_loss", "Distiller",
           "cpu_capability"]


def cpu_capability() -> str:
    """The CPU code path fgd's kernels run: "avx512", "avx2" or "default".

    It follows torch's (``torch.backends.cpu.get_cpu_capability()``, which the environment variable
    ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` sets before torch is imported), lowered to what this
    CPU supports, and is fixed for the life of the process.
    """
    return _C.cpu_capability()


def cuda_compiled() -> bool:
    """Whether this build of fgd carries the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fgd::box_iou", "CUDA")
