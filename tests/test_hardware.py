"""restorer.hardware: the per-machine speed rules, with the CPU's capability simulated."""

from __future__ import annotations

import time

import pytest
import torch

from restorer import hardware


def test_unreadable_capability_falls_back_to_a_bounded_measured_probe(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_bf16_capability", lambda: None)
    t0 = time.perf_counter()
    native, why = hardware.cpu_native_bf16()
    assert time.perf_counter() - t0 < 4.0  # the probe's budget is 2 s (+ warm-up)
    assert isinstance(native, bool) and why.startswith("measured probe: bf16 autocast")
    monkeypatch.setattr(hardware, "probe_cpu_bf16", lambda: (False, "probe says no"))
    assert hardware.choose_precision("auto", torch.device("cpu")) == hardware.Choice("no", "probe says no")


@pytest.mark.parametrize(
    "machine,flags,native",
    [
        ("x86_64", {"avx2", "fma"}, False),
        ("x86_64", {"avx2", "avx512_bf16"}, True),
        ("x86_64", {"amx_bf16"}, True),
        ("aarch64", {"asimd", "bf16"}, True),
        ("aarch64", {"asimd"}, False),
        ("x86_64", set(), None),
        ("riscv64", {"rv64"}, None),
    ],
)
def test_capability_from_cpu_flags_when_torch_cannot_tell(monkeypatch, machine, flags, native):
    monkeypatch.setattr(hardware.platform, "machine", lambda: machine)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(hardware, "_cpu_flags", lambda: flags)
    got = hardware.cpu_bf16_capability()
    assert (got if got is None else got[0]) == native


def test_rules_and_explicit_settings():
    cpu = torch.device("cpu")
    assert hardware.choose_precision("bf16", cpu) == hardware.Choice("bf16", "set explicitly")
    assert hardware.choose_channels_last("auto", cpu, "bf16").value is True
    assert hardware.choose_channels_last("auto", cpu, "no").value is False
    assert hardware.choose_channels_last("false", cpu, "bf16").value is False
    assert hardware.choose_compile("auto", cpu).value is False and hardware.choose_compile(True, cpu).value is True
    with pytest.raises(ValueError, match="auto, true or false"):
        hardware.choose_compile("maybe", cpu)
    with pytest.raises(ValueError, match="mixed precision"):
        hardware.choose_precision("fp8", cpu)
