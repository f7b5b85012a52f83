"""Our CPU kernels for small-batch decode (fp32, bf16, int8, int4 rows), built once with the system C compiler.

Loaded with ctypes: no torch headers to compile, so the one-time build takes about a second. Callers fall
back to PyTorch ops when the build fails or the CPU lacks AVX2/FMA (``why_unavailable`` says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("cpu.c")
_lib = None
_why: str | None = None
MAX_M = 8


def _cpu_ok() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


def _torch_gomp() -> Path | None:
    """Link against the libgomp torch already loaded, so one OpenMP runtime serves both."""
    libdir = Path(torch.__file__).parent / "lib"
    hits = sorted(libdir.glob("libgomp*.so*"))
    return hits[0] if hits else None


def _build() -> ctypes.CDLL | None:
    global _why
    if os.environ.get("SLIMSWARM_NO_KERNELS"):
        _why = "disabled by SLIMSWARM_NO_KERNELS"
        return None
    if sys.platform != "linux" or not _cpu_ok():
        _why = "needs Linux on an x86-64 CPU with AVX2 and FMA"
        return None
    src = _SRC.read_bytes()
    key = hashlib.sha1(src).hexdigest()[:12]
    cache = Path(os.environ.get("SLIMSWARM_CACHE", Path.home() / ".cache" / "slimswarm")) / "kernels"
    so = cache / f"cpu-{key}.so"
    if not so.exists():
        cache.mkdir(parents=True, exist_ok=True)
        cc = os.environ.get("CC", "cc")
        gomp = _torch_gomp()
        link = [str(gomp), f"-Wl,-rpath,{gomp.parent}"] if gomp else ["-lgomp"]
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        cmd = [cc, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(_SRC), "-o", tmp, *link]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            _why = f"C compiler failed: {e}"
            os.unlink(tmp)
            return None
        if r.returncode != 0:
            _why = "C compiler failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]
            os.unlink(tmp)
            return None
        os.replace(tmp, so)  # atomic: a concurrent build never sees half a library
    lib = ctypes.CDLL(str(so))
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.ss_linear_float.argtypes = [P, P, P, P, I, I, I, ctypes.c_int, ctypes.c_int]
    lib.ss_linear_float.restype = None
    lib.ss_linear_quant.argtypes = [P, P, P, P, P, P, I, I, I, I, ctypes.c_int, ctypes.c_int]
    lib.ss_linear_quant.restype = None
    return lib


def lib():
    global _lib
    if _lib is None and _why is None:
        _lib = _build()
    return _lib


def available() -> bool:
    return lib() is not None


def why_unavailable() -> str | None:
    lib()
    return _why


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def linear_float(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M,K] fp32 (M <= 8) times w [N,K] fp32 or bf16, fp32 out. Caller checks shapes/contiguity."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    lib().ss_linear_float(_ptr(x), _ptr(w), _ptr(bias), _ptr(y), m, n, k, 32 if w.dtype == torch.float32 else 16,
                          torch.get_num_threads())
    return y


def linear_quant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M,K] fp32 (M <= 8) times codes q (uint8 [N,K] for 8 bits, [N,K/2] for 4) with fp32 scale/zero [N,G]."""
    m, k = x.shape
    n = q.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    lib().ss_linear_quant(_ptr(x), _ptr(q), _ptr(scale), _ptr(zero), _ptr(bias), _ptr(y), m, n, k, group_size, bits,
                          torch.get_num_threads())
    return y
