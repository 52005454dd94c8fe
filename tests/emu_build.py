"""Builds the CUDA kernels of csrc/cuda/*.cu for the CPU through the emulator (csrc/emulator/) and
loads them as torch.ops.fgd_emu.* beside fgd._C, for the tests in test_cuda_emu.py.

The build uses the checkout's csrc/ (found from this file; FGD_EMU_CSRC points elsewhere, e.g. at a
mutated copy). Each object is cached under build/emu/ by a hash of its source, every header under
csrc/, the flags, the compiler and torch: editing any .cu/.cuh/.h file rebuilds what it affects.

    python tests/emu_build.py             # build (and time) the emulated library
    python tests/emu_build.py --tsan      # every kernel once, one OS thread per CUDA thread,
                                          # under ThreadSanitizer: the data races it reports
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.utils import cpp_extension

REPO = Path(__file__).resolve().parents[1]
LIBRARY = "fgd_emu"


def csrc_dir() -> Path:
    return Path(os.environ.get("FGD_EMU_CSRC") or REPO / "csrc").resolve()


def sources(csrc: Path) -> list[Path]:
    """The emulated library: the shared schemas and checks, the device-generic driver, every .cu."""
    return [csrc / "fgd.cpp", csrc / "masked_adapt.cpp", csrc / "emulator" / "emu_ops.cpp",
            *sorted((csrc / "cuda").glob("*.cu"))]


def _compiler() -> str:
    return os.environ.get("CXX") or shutil.which("c++") or "g++"


def flags(threads: bool = False) -> list[str]:
    f = ["-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-DFGD_EMU", f"-DFGD_LIBRARY={LIBRARY}",
         f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-w"]
    f += [f"-I{p}" for p in cpp_extension.include_paths()]
    if threads:
        f += ["-DFGD_EMU_THREADS", "-fsanitize=thread", "-g"]
    return f


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()[:20]


def build(csrc: Path | None = None, *, threads: bool = False, cache: Path | None = None,
          verbose: bool = True) -> Path:
    """Compiles (what changed) and links the emulated library; returns the .so's path."""
    csrc = csrc or csrc_dir()
    cache = cache or Path(os.environ.get("FGD_EMU_CACHE") or REPO / "build" / "emu")
    (cache / "obj").mkdir(parents=True, exist_ok=True)
    cxx, fl = _compiler(), flags(threads)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    headers = b"".join(p.relative_to(csrc).as_posix().encode() + p.read_bytes()
                       for p in sorted(csrc.rglob("*")) if p.suffix in (".h", ".cuh"))
    common = _digest(" ".join([cxx, *fl]).encode(), version.encode(), torch.__version__.encode(), headers)

    def compile_one(src: Path) -> Path:
        obj = cache / "obj" / f"{src.stem}-{_digest(common.encode(), src.relative_to(csrc).as_posix().encode(), src.read_bytes())}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, *fl, "-x", "c++", "-c", str(src), "-o", str(tmp)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"emulated build of {src} failed:\n{' '.join(cmd)}\n{r.stderr[-6000:]}")
            tmp.replace(obj)  # atomic: concurrent builds never see half an object
            if verbose:
                print(f"[fgd emu] compiled {src.relative_to(csrc)}", file=sys.stderr)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objs = list(pool.map(compile_one, sources(csrc)))
    so = cache / f"lib{LIBRARY}-{_digest(*(o.name.encode() for o in objs))}.so"
    if not so.exists():
        lib = Path(torch.__file__).parent / "lib"
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, "-shared", *map(str, objs), "-o", str(tmp), f"-L{lib}", "-lc10", "-ltorch_cpu",
               f"-Wl,-rpath,{lib}"] + (["-fsanitize=thread"] if threads else [])
        subprocess.run(cmd, check=True)
        tmp.replace(so)
    return so


_loaded: Path | None = None


def load(csrc: Path | None = None):
    """Builds and loads the emulated library once per process; returns torch.ops.fgd_emu."""
    global _loaded
    so = build(csrc)
    if _loaded is None:
        import fgd  # noqa: F401  (torch.ops.fgd first: the fakes and autograd rules below follow it)

        torch.ops.load_library(str(so))
        fgd.ops._register(LIBRARY)
        _loaded = so
    elif _loaded != so:
        raise RuntimeError(f"another emulated build ({_loaded}) is already loaded in this process")
    return getattr(torch.ops, LIBRARY)


# Small calls of every kernel (one OS thread per CUDA thread is slow), and the self-test kernels that
# count with a plain += (must be reported) and with atomicAdd (must not).
_TSAN_SCRIPT = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
E = torch.ops.fgd_emu
E._emu_configure(0, 2, 2)
g = torch.Generator().manual_seed(0)
def run(name, fn):
    print(f"=== {name}", file=sys.stderr, flush=True)
    fn()
b = torch.rand(40, 4, generator=g) * 50; b[:, 2:] += b[:, :2]
run("box_iou", lambda: E.box_iou(b, b, 0.0))
anchors = b.repeat(3, 1)  # 120 anchors = 12 x 10 locations, K 1
run("imitation_mask", lambda: E.imitation_mask(anchors, b[None, :8].repeat(2, 1, 1), torch.tensor([8, 3]), [12, 10], 0.5, 0.0))
s, t = torch.randn(2, 3, 12, 10, generator=g), torch.randn(2, 3, 12, 10, generator=g)
m = torch.rand(2, 12, 10, generator=g) < 0.3
run("imitation_loss", lambda: (E.imitation_loss(s, t, m), E._imitation_loss_backward(torch.tensor(1.0), s, t, m)))
w = torch.randn(4, 3, 3, 3, generator=g)
t4 = torch.randn(2, 4, 12, 10, generator=g)
def adapt():
    _, saved, idx = E._masked_adapt_forward(s, t4, m, w, None, True, True)
    E._masked_adapt_backward(torch.tensor(1.0), saved, idx, s, t4, m, w, None, True, [True, True, True, False])
run("masked_adapt (im2col, epilogue, col2im)", adapt)
run("selftest count_atomic (no race expected)", lambda: print(E._emu_selftest("count_atomic")))
run("selftest count_plain (a race expected)", lambda: print(E._emu_selftest("count_plain")))
"""


def _tsan() -> int:
    """Runs every kernel once with one OS thread per CUDA thread under ThreadSanitizer and prints
    the data races it reports, per step."""
    so = build(threads=True)
    libtsan = subprocess.run([_compiler(), "-print-file-name=libtsan.so"], capture_output=True,
                             text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=libtsan, TSAN_OPTIONS="report_signal_unsafe=0 exitcode=0")
    # setarch -R: ThreadSanitizer refuses some address-space layouts that randomisation produces.
    cmd = ["setarch", "-R", sys.executable, "-c", _TSAN_SCRIPT, str(so)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    step, races = None, {}
    for line in r.stderr.splitlines():
        if line.startswith("=== "):
            step = line[4:]
            races.setdefault(step, 0)
        elif "WARNING: ThreadSanitizer: data race" in line:
            races[step] = races.get(step, 0) + 1
    print(r.stdout, end="")
    for name, n in races.items():
        print(f"{name}: {n} data race report(s)")
    if r.returncode != 0:
        print(r.stderr[-4000:])
    return r.returncode


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tsan", action="store_true")
    args = ap.parse_args()
    if args.tsan:
        sys.exit(_tsan())
    import time

    t0 = time.perf_counter()
    print(build(), f"({time.perf_counter() - t0:.1f} s)")
