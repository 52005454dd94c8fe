import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_python(code, **kw):
    # outside the source tree: `python -c` puts the working directory first on sys.path, and the
    # source tree's fgd/ has no compiled extension after a plain `pip install .`
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300, cwd=tempfile.gettempdir(), **kw)


def test_broken_extension_gives_an_import_error_that_says_how_to_rebuild():
    r = run_python("""
        import sys
        sys.modules["fgd._C"] = None  # what a stale or missing build looks like to the importer
        import fgd
    """)
    assert r.returncode != 0
    assert "ImportError: fgd's compiled extension (fgd._C) could not be loaded" in r.stderr
    assert "pip install --no-build-isolation --force-reinstall --no-deps ." in r.stderr


def test_ops_are_registered_once_with_every_backend():
    import fgd

    for name in ("box_iou", "imitation_mask", "imitation_loss", "_imitation_loss_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fgd::{name}", "CPU")
        if fgd.cuda_compiled():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fgd::{name}", "CUDA")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_cpu_library(tmp_path):
    build = tmp_path / "build"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    if torch.version.cuda and os.path.isdir(cuda_home):
        # torch's CMake config looks for the toolkit whenever torch is a CUDA build
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lib = build / "libfgd.so"
    assert lib.exists()
    r = run_python(f"""
        import torch
        torch.ops.load_library({str(lib)!r})
        b = torch.tensor([[0.0, 0, 10, 10], [5.0, 5, 15, 15]])
        print(torch.ops.fgd.box_iou(b, b)[0, 1].item())
    """)
    assert r.returncode == 0, r.stderr
    assert abs(float(r.stdout) - 25 / 175) < 1e-6


def test_cuda_kernels_are_compiled_where_they_can_be():
    """CI has no GPU, but with a CUDA torch and nvcc the CUDA kernels must still compile and link."""
    import fgd

    nvcc = shutil.which("nvcc") or os.path.exists(
        os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or os.environ.get("FGD_CPU_ONLY") == "1":
        pytest.skip("no CUDA build of torch or no nvcc: a CPU-only build is expected")
    assert fgd.cuda_compiled()
