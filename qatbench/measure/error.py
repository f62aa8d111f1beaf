"""Output error of a model against its fp32 reference, whole-model and per layer."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from qatbench.data.inputs import Batch, call

_CHUNK = 1 << 16  # elements per step of the sums: their temporaries stay in cache


def output_error(reference: torch.Tensor, actual: torch.Tensor) -> dict[str, float]:
    """``mse``, ``max_abs_error``, ``sqnr_db`` and ``cosine`` of ``actual`` vs ``reference``.

    Elementwise in the outputs' own precision (fp32: a language model's logits are tens of
    millions of values), every sum accumulated in float64, a chunk at a time (8 x 128
    GPT-2 logits: 0.4 s, against 1.6 s for whole-tensor temporaries)."""
    ref = reference.detach().float().flatten()
    out = actual.detach().float().flatten()
    count = max(ref.numel(), 1)
    noise_sum = signal_sum = out_sum = dot = 0.0
    max_abs = 0.0
    for start in range(0, ref.numel(), _CHUNK):
        r, o = ref[start : start + _CHUNK], out[start : start + _CHUNK]
        noise = r - o
        noise_sum += float(torch.sum(noise * noise, dtype=torch.float64))
        signal_sum += float(torch.sum(r * r, dtype=torch.float64))
        out_sum += float(torch.sum(o * o, dtype=torch.float64))
        dot += float(torch.sum(r * o, dtype=torch.float64))
        max_abs = max(max_abs, float(noise.abs().max()))
    mse = noise_sum / count
    signal = signal_sum / count
    sqnr = math.inf if mse == 0 else 10 * math.log10(max(signal, 1e-300) / mse)
    norms = math.sqrt(signal_sum) * math.sqrt(out_sum)
    cosine = max(-1.0, min(1.0, dot / norms)) if norms > 0 else 0.0
    return {
        "mse": mse,
        "max_abs_error": max_abs,
        "sqnr_db": min(sqnr, 400.0),  # identical outputs: capped, so the value stays a number
        "cosine": cosine,
    }


# fp32 outputs whose root-mean-square is below this carry no signal to compare against
# (a randomly initialised MobileNetV3 in eval mode gives about 1e-9).
TINY_REFERENCE_RMS = 1e-6


def degenerate_outputs(reference: torch.Tensor, actual: torch.Tensor) -> str | None:
    """Why no quality figure of ``actual`` against ``reference`` can be trusted, or None:
    the candidate's outputs hold NaN or Inf or are all zero, or the fp32 outputs are too
    small to compare (root-mean-square under :data:`TINY_REFERENCE_RMS`)."""
    out = actual.detach()
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        return "the outputs hold NaN or Inf"
    if not bool(out.any()):
        return "the outputs are all zero"
    ref = reference.detach().float().flatten()
    squares = sum(float(torch.sum(r * r, dtype=torch.float64)) for r in ref.split(_CHUNK))
    ref_rms = math.sqrt(squares / max(ref.numel(), 1))
    if not ref_rms >= TINY_REFERENCE_RMS:
        return f"the fp32 outputs are too small to compare (rms {ref_rms:.2g})"
    return None


def accuracy_percent(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((logits.argmax(dim=-1) == labels).double().mean())


def layer_errors(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    inputs: Batch,
    run_candidate_layer: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None = None,
) -> list[dict[str, float | str]]:
    """Each replaced layer's output against the fp32 layer's on the same inputs.

    A layer is "replaced" when the candidate's module at the same qualified name has a
    different type from the reference's (e.g. ``QuantizedLinear`` for ``Linear``). Both see
    the input the fp32 layer saw in the fp32 model, so errors do not compound. Sorted
    worst (lowest SQNR) first.
    """
    ref_modules = dict(reference.named_modules())
    pairs = {
        name: (ref_modules[name], module)
        for name, module in candidate.named_modules()
        if name and name in ref_modules and type(ref_modules[name]) is not type(module)
    }
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def save(_module: torch.nn.Module, args: tuple[torch.Tensor, ...], _out: object) -> None:
            captured.setdefault(name, args[0].detach())

        return save

    handles = [ref.register_forward_hook(hook(n)) for n, (ref, _) in pairs.items()]
    try:
        with torch.no_grad():
            call(reference, inputs)
    finally:
        for handle in handles:
            handle.remove()
    rows: list[dict[str, float | str]] = []
    with torch.no_grad():
        for name, (ref, cand) in pairs.items():
            if name not in captured:
                continue
            x = captured[name]
            out = run_candidate_layer(cand, x) if run_candidate_layer else cand(x)
            err = output_error(ref(x), out)
            rows.append({"layer": name, "type": type(cand).__name__, **err})
    return sorted(rows, key=lambda r: float(r["sqnr_db"]))
