"""Builds fgd._C: the CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc is
found (FGD_FORCE_CUDA=1 forces them, FGD_CPU_ONLY=1 skips them)."""
import glob
import os
import shutil
import sys

from setuptools import setup

import torch
from torch.utils import cpp_extension


def _want_cuda():
    if os.environ.get("FGD_CPU_ONLY", "0") == "1":
        return False
    if os.environ.get("FGD_FORCE_CUDA", "0") == "1":
        return True
    if torch.version.cuda is None:
        return False
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        # torch otherwise guesses /usr/local when no GPU is present.
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
        cpp_extension.CUDA_HOME = "/usr/local/cuda"
    return cpp_extension.CUDA_HOME is not None and (
        shutil.which("nvcc") is not None
        or os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc"))
    )


def extension():
    sources = ["csrc/fgd.cpp", "csrc/masked_adapt.cpp", "csrc/python_module.cpp"]
    sources += sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fno-trapping-math lets the CPU loops' selects vectorise on AVX2 (csrc/cpu/vec.h).
    cxx = ["-O3", "-fvisibility=hidden", "-fno-trapping-math"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inline OpenMP in torch's headers: without -fopenmp it runs serially.
        # libgomp resolves to the copy torch already loaded (same soname).
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if not _want_cuda():
        return cpp_extension.CppExtension("fgd._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=link)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return cpp_extension.CUDAExtension(
        "fgd._C",
        sources + sorted(glob.glob("csrc/cuda/*.cu")),
        define_macros=[("FGD_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=link,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
