"""restorer.hardware: the per-machine speed rules, with the CPU's capability simulated."""

from __future__ import annotations

import itertools
import types

import pytest
import torch

from restorer import hardware


def test_unreadable_capability_falls_back_to_a_bounded_measured_probe(monkeypatch):
    """The probe really runs (fp32 and bf16 passes), timed by a clock that advances 0.25 s per
    reading, so that its budget is checked without a wall-clock assert: each pass "takes" 0.25 s and
    a round (fp32 + bf16 + the budget check) 1.25 s. By its own clock it ends within its 2 s budget
    plus the warm-up and one round, never running its 20 rounds (25 s by this clock)."""
    monkeypatch.setattr(hardware, "cpu_bf16_capability", lambda: None)
    ticks = itertools.count(0.0, 0.25)
    with monkeypatch.context() as mp:
        mp.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
        native, why = hardware.cpu_native_bf16()
        elapsed = next(ticks) - 0.25  # the readings the probe took, in its clock's seconds
    assert 2.0 / 2 <= elapsed <= 2.0 + 2 * 1.25
    assert native is False and why == "measured probe: bf16 autocast 1.00x the speed of fp32 on this CPU"
    monkeypatch.setattr(hardware, "probe_cpu_bf16", lambda: (False, "probe says no"))
    assert hardware.choose_precision("auto", torch.device("cpu")) == hardware.Choice("fp32", "probe says no")


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
    assert hardware.choose_channels_last("auto", cpu, "fp32").value is False
    assert hardware.choose_channels_last("false", cpu, "bf16").value is False
    assert hardware.choose_compile("auto", cpu).value is False and hardware.choose_compile(True, cpu).value is True
    with pytest.raises(ValueError, match="auto, true or false"):
        hardware.choose_compile("maybe", cpu)
    with pytest.raises(ValueError, match="mixed precision"):
        hardware.choose_precision("fp8", cpu)


def test_one_precision_vocabulary_with_aliases():
    """auto|fp32|bf16|fp16 for training and inference; Accelerate's 'no' is read as fp32 and
    written back only where Accelerate is created."""
    cpu = torch.device("cpu")
    assert hardware.PRECISIONS == ("auto", "fp32", "bf16", "fp16")
    assert hardware.canonical_precision("no") == "fp32" and hardware.canonical_precision("BF16") == "bf16"
    assert hardware.choose_precision("no", cpu) == hardware.Choice("fp32", "set explicitly")
    assert [hardware.accelerate_precision(p) for p in ("fp32", "no", "bf16", "fp16")] == ["no", "no", "bf16", "fp16"]
    with pytest.raises(ValueError, match="auto, fp32, bf16, fp16"):
        hardware.canonical_precision("fp8")
