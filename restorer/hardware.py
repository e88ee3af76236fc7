"""Speed choices made on the machine at run time: precision, memory format, torch.compile.

Nothing here is a figure measured on one machine and hard-coded for all. Each ``choose_*`` returns a
:class:`Choice` (the value and the reason, in words) that the programs print at start and record
(``run_info.json``, W&B config). An explicit setting always wins over ``auto``.

Rules (``auto``):

* precision on CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16 (with loss scaling
  in training); on CPU: bf16 only where the CPU computes bf16 natively (x86 AVX512-BF16 or AMX,
  Arm's BF16 extension). Without it bf16 autocast on CPU is emulated and was measured 10-30x
  slower than fp32 (2-core AMD EPYC, AVX2); with it, about 2x faster. Where the capability cannot
  be read (another architecture, an older torch), a short measured probe (<= 2 s) decides.
* channels_last: on CUDA yes (tensor-core convolutions are NHWC); on CPU only together with
  native bf16 (bf16 + channels_last was the fastest CPU variant there; channels_last alone was
  0.71x of fp32 on an AVX2 CPU).
* compile: on CUDA yes (1.49x model-only on an H200), on CPU no (0.78x measured on CPU).
  :func:`compile_or_eager` falls back to eager mode with one warning when compiling fails.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from restorer.errors import first_line

log = logging.getLogger("restorer.hardware")

# The one precision vocabulary of training (--mixed-precision) and inference (--precision).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Other spellings accepted for them: Accelerate's "no" (and "fp32" spelled as a dtype) mean fp32.
PRECISION_ALIASES = {"no": "fp32", "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def canonical_precision(text: str) -> str:
    """A precision as given (any case, an alias) -> its name in :data:`PRECISIONS`; ValueError else."""
    low = str(text).strip().lower()
    low = PRECISION_ALIASES.get(low, low)
    if low not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {text!r}")
    return low


def accelerate_precision(precision: str) -> str:
    """The name Accelerate's ``mixed_precision`` takes for a chosen precision (fp32 -> "no")."""
    value = canonical_precision(precision)
    return "no" if value == "fp32" else value


AUTO_BOOL = ("auto", "true", "false")


@dataclasses.dataclass(frozen=True)
class Choice:
    value: object
    reason: str

    def as_dict(self) -> dict:
        return {"value": self.value, "reason": self.reason}


def _cpuinfo(keys: tuple[str, ...]) -> list[str]:
    """The values of /proc/cpuinfo lines whose (lower-case) key is in ``keys``; [] where unreadable."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []
    pairs = (line.partition(":") for line in text.splitlines())
    return [value.strip() for key, _, value in pairs if key.strip().lower() in keys]


def _cpu_flags() -> set[str]:
    """Feature words of /proc/cpuinfo (x86 'flags', Arm 'Features'); empty where unreadable."""
    return {word for value in _cpuinfo(("flags", "features")) for word in value.split()}


def device_name(device: torch.device) -> str:
    """What a run ran on, for run_info.json and model cards: the GPU's name, or the CPU's model name
    (/proc/cpuinfo, else the platform's) with its core count and whether it computes bf16 natively."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = next(iter(_cpuinfo(("model name",))), "")
    bf16 = cpu_bf16_capability()
    native = "" if bf16 is None else (", native bf16" if bf16[0] else ", no native bf16")
    return f"{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores{native})"


def cpu_bf16_capability() -> tuple[bool, str] | None:
    """(native bf16?, evidence) from the CPU's features, or None where they cannot be read."""
    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686", "x86"):
        if callable(avx512_bf16) and callable(amx):
            if avx512_bf16() or amx():
                return True, "CPU has " + ("AMX" if amx() else "AVX512-BF16") + " (native bf16)"
            return False, "CPU lacks AVX512-BF16 and AMX (bf16 would be emulated)"
        flags = _cpu_flags()
        if flags:
            native = bool(flags & {"avx512_bf16", "amx_bf16"})
            return native, (
                "CPU flags include avx512_bf16/amx_bf16"
                if native
                else "CPU flags lack avx512_bf16 and amx_bf16 (bf16 would be emulated)"
            )
        return None
    if machine in ("aarch64", "arm64"):
        flags = _cpu_flags()
        if flags:
            native = "bf16" in flags
            return native, "Arm CPU " + ("has" if native else "lacks") + " the BF16 extension"
        return None
    return None


def probe_cpu_bf16(budget_s: float = 2.0) -> tuple[bool, str]:
    """Time a small conv forward+backward in fp32 and under bf16 autocast; bf16 wins only if it is
    at least 1.2x faster. Bounded by ``budget_s`` in total."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.PReLU(), torch.nn.Conv2d(32, 32, 3, padding=1)
    )
    x = torch.rand(4, 32, 48, 48)

    def once(bf16: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        out.float().square().mean().backward()
        return time.perf_counter() - t0

    deadline = time.perf_counter() + budget_s
    best = {False: float("inf"), True: float("inf")}
    for round_ in range(20):  # round 0 is a warm-up; then best of the rounds that fit the budget
        for bf16 in (False, True):
            t = once(bf16)
            if round_ > 0:
                best[bf16] = min(best[bf16], t)
        if round_ > 0 and time.perf_counter() + 2 * (best[False] + best[True]) > deadline:
            break
    ratio = best[False] / best[True]
    return ratio >= 1.2, f"measured probe: bf16 autocast {ratio:.2f}x the speed of fp32 on this CPU"


def cpu_native_bf16() -> tuple[bool, str]:
    """Whether bf16 pays on this CPU: from its features, else from :func:`probe_cpu_bf16`."""
    known = cpu_bf16_capability()
    return known if known is not None else probe_cpu_bf16()


def choose_precision(requested: str, device: torch.device) -> Choice:
    """``auto`` | ``fp32`` | ``bf16`` | ``fp16`` (or an alias: ``no``) -> the precision to use on
    ``device``, named as in :data:`PRECISIONS`."""
    try:
        requested = canonical_precision(requested)
    except ValueError as exc:
        raise ValueError(f"mixed {exc}") from None
    if requested != "auto":
        return Choice(requested, "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", f"{torch.cuda.get_device_name(device)} supports bf16")
        return Choice("fp16", f"{torch.cuda.get_device_name(device)} lacks bf16: fp16 with loss scaling")
    if device.type == "cpu":
        native, why = cpu_native_bf16()
        return Choice("bf16" if native else "fp32", why)
    return Choice("fp32", f"no mixed precision rule for device type {device.type!r}: fp32")


def _auto_bool(requested: str | bool, what: str) -> bool | None:
    """True/False for an explicit setting, None for auto."""
    if isinstance(requested, bool):
        return requested
    low = str(requested).strip().lower()
    if low == "auto":
        return None
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what} must be auto, true or false, got {requested!r}")


def choose_channels_last(requested: str | bool, device: torch.device, precision: str) -> Choice:
    """channels_last memory format: on CUDA yes; on CPU only with bf16 (see the module doc)."""
    explicit = _auto_bool(requested, "channels_last")
    if explicit is not None:
        return Choice(explicit, "set explicitly")
    device = torch.device(device)
    if device.type == "cuda":
        return Choice(True, "CUDA convolutions run NHWC on tensor cores")
    if precision == "bf16":
        return Choice(True, "CPU with bf16: bf16 + channels_last is the fast CPU path")
    return Choice(False, "CPU in fp32: channels_last alone is slower")


def choose_compile(requested: str | bool, device: torch.device) -> Choice:
    """torch.compile: on CUDA yes, on CPU no (measured slower there)."""
    explicit = _auto_bool(requested, "compile")
    if explicit is not None:
        return Choice(explicit, "set explicitly")
    if torch.device(device).type == "cuda":
        return Choice(True, "CUDA: torch.compile measured 1.49x model-only (H200)")
    return Choice(False, "CPU: torch.compile measured slower (0.78x)")


def compile_or_eager(model: torch.nn.Module, smoke: Callable[[Callable], None]) -> tuple[Callable, str | None]:
    """``torch.compile(model)``, tried at once with ``smoke(compiled)`` (a forward/backward on a
    real-shaped batch); returns (the compiled module, None), or (``model``, the reason) when
    compiling or running the compiled graph fails -- one warning line, never a crash. The
    compiled wrapper shares ``model``'s parameters; save ``model`` itself (keys without
    ``_orig_mod.``)."""
    try:
        compiled = torch.compile(model)
        smoke(compiled)
    except Exception as exc:  # inductor has many failure types (no compiler, unsupported op, ...)
        reason = f"torch.compile failed ({type(exc).__name__}: {first_line(exc)}); running eager"
        log.warning(reason)
        for p in model.parameters():
            p.grad = None
        return model, reason
    for p in model.parameters():
        p.grad = None
    return compiled, None
