"""One decoded row through a packed integer kernel in one native call.

Decoding at batch 1 sends one row through every weight-only layer, and at the widths of
small decoders the ops around the kernel cost as much as the kernel saves: from Python, a
128x384 int4 layer ran the cast into its bf16 scratch row (0.9 us), the kernel (5.2 us)
and the bias add that casts back (2.7 us), against 8.8 us for ``F.linear`` (each op
timed alone). Each op pays the Python-to-dispatcher crossing, and the promoting add a
``TensorIterator``.

:func:`one_row_kernel` is the same three steps in one C++ function, built once per machine
with :func:`torch.utils.cpp_extension.load_inline` (a C++ compiler and ``ninja``; about
40 s on two cores) into ``qatbench_rows_<hash of the source, torch and Python>`` under
``TORCH_EXTENSIONS_DIR`` (by default ``~/.cache/torch_extensions``), which later
processes import directly: the input is rounded to bf16 into the scratch row in a loop, the kernel
is called from C++, and the bf16 output is widened to fp32 with the bias added in a loop.
The numbers are the same as the three ops' (round to nearest even; fp32 add), bit for bit;
``tests/test_weight_only.py`` compares them. Where the build fails (no compiler, no
headers) or ``QATBENCH_NATIVE_ROWS=0`` is set, layers keep the three ops, and
:func:`status` says why (a trial's ``torch_one_row`` detail).

Per call of the layer (module calls, one row, one thread, ``time.thread_time``, median of
9 rounds of 3,000 calls, all in one run; 2-core AMD EPYC with avx512_vnni and
avx512_bf16, torch 2.13), int4 in groups of 32 against ``nn.Linear``:

==========  =============  =========  =========
layer       ``nn.Linear``  three ops  native
==========  =============  =========  =========
128x128     7.1 us         9.2 us     4.9 us
128x384     9.7 us         11.1 us    6.8 us
512x128     10.3 us        12.1 us    8.1 us
768x3072    181 us         139 us     134 us
==========  =============  =========  =========
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

DISABLE_ENV = "QATBENCH_NATIVE_ROWS"  # "0": keep the three ops (an A/B switch)
STALE_LOCK_S = 600  # a build takes under a minute on two cores; older locks are leftovers

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

// x [.., in] -> row (bf16 [1, padded_in], its tail kept zero) -> kernel -> fp32 [.., out].
// group > 0: _weight_int4pack_mm_for_cpu in groups of `group`; group == 0:
// _weight_int8pack_mm. input_scale (AWQ's 1/s) multiplies x before the rounding.
at::Tensor one_row(const at::Tensor& x, const c10::optional<at::Tensor>& input_scale,
                   at::Tensor& row, const at::Tensor& weight, const at::Tensor& scales,
                   int64_t group, const c10::optional<at::Tensor>& bias,
                   int64_t out_features) {
  const int64_t n = x.numel();
  const bool plain_scale = !input_scale.has_value() ||
      (input_scale->scalar_type() == at::kFloat && input_scale->is_contiguous() &&
       input_scale->numel() == n);
  if (x.scalar_type() == at::kFloat && x.is_contiguous() && plain_scale) {
    const float* xp = x.data_ptr<float>();
    auto* rp = row.data_ptr<at::BFloat16>();
    if (input_scale.has_value()) {
      const float* sp = input_scale->data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) rp[i] = at::BFloat16(xp[i] * sp[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) rp[i] = at::BFloat16(xp[i]);
    }
  } else {
    at::Tensor scaled = input_scale.has_value() ? x * *input_scale : x;
    row.narrow(1, 0, n).copy_(scaled.reshape({1, n}));
  }
  at::Tensor y = group > 0 ? at::_weight_int4pack_mm_for_cpu(row, weight, group, scales)
                           : at::_weight_int8pack_mm(row, weight, scales);
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out_features;
  const auto* yp = y.data_ptr<at::BFloat16>();
  if (bias.has_value() && !(bias->scalar_type() == at::kFloat && bias->is_contiguous())) {
    return at::add(*bias, y.narrow(1, 0, out_features)).view(sizes);
  }
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  if (bias.has_value()) {
    const float* bp = bias->data_ptr<float>();
    for (int64_t j = 0; j < out_features; ++j) op[j] = static_cast<float>(yp[j]) + bp[j];
  } else {
    for (int64_t j = 0; j < out_features; ++j) op[j] = static_cast<float>(yp[j]);
  }
  return out;
}
"""

_reason: list[str] = []


@functools.cache
def one_row_kernel() -> Callable[..., Any] | None:
    """The native one-row function, loaded if this machine built it, else built; None
    where it cannot be (then :func:`status` says why)."""
    if os.environ.get(DISABLE_ENV, "1") == "0":
        _reason.append(f"three ops: {DISABLE_ENV}=0")
        return None
    name, folder = _build_place()
    try:
        module = _load_built(name, folder)
        if module is None:
            from torch.utils.cpp_extension import load_inline

            folder.mkdir(parents=True, exist_ok=True)
            _drop_stale_lock(folder / "lock")
            module = load_inline(
                name,
                cpp_sources=[SOURCE],
                functions=["one_row"],
                extra_cflags=["-O2"],
                build_directory=str(folder),
                verbose=False,
            )
    except Exception as exc:  # no compiler, headers or ninja: the three ops stay
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _reason.append(f"three ops: the native row kernel did not build ({first[:200]})")
        return None
    return module.one_row  # type: ignore[no-any-return]


def _build_place() -> tuple[str, Path]:
    """The module's name and build folder: one per source, torch and Python version, under
    ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)."""
    import torch

    key = f"{SOURCE}{torch.__version__}{sys.implementation.cache_tag}"
    name = f"qatbench_rows_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return name, Path(root) / name


def _drop_stale_lock(lock: Path) -> None:
    """Remove a build lock older than ``STALE_LOCK_S``: a build killed midway (a trial's
    timeout) leaves it, and ``load_inline`` would wait for it forever."""
    try:
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            lock.unlink(missing_ok=True)
    except FileNotFoundError:
        pass


def _load_built(name: str, folder: Path) -> ModuleType | None:
    """The module built before, imported without asking ``load_inline``: that reruns
    ``ninja``, and a ``ninja`` of another version (a virtual environment's against the
    system's) reads the build log as changed and compiles again, most of a minute. None
    where there is no finished build (``lock``: one is being made)."""
    library = folder / f"{name}{'.pyd' if sys.platform == 'win32' else '.so'}"  # torch's names
    if not library.is_file() or (folder / "lock").exists():
        return None
    import torch  # noqa: F401  # the library links against torch's, loaded first

    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        return None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def status() -> str:
    """``native``, or why one row runs three ops."""
    return "native" if one_row_kernel() is not None else _reason[-1]
