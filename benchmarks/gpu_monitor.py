"""The GPU's clocks, power and temperature while a benchmark times something, and the machine it ran on.

A median on an H100 moves by several percent with the SM clock, which the GPU lowers
on its own under a power or thermal limit. `GpuMonitor` samples `nvidia-smi` in the
background so that every timing can be recorded with the state it ran in.

    with GpuMonitor() as monitor:
        start = monitor.now()
        ms = triton.testing.do_bench(fn)
        state = monitor.state_since(start)  # {"sm_clock_mhz": ..., "power_w": ..., ...}

`environment(device)` gives the machine, device and library versions a benchmark records.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

import torch

_FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"
# Bits of clocks_event_reasons.active (nvidia-smi -q lists them) worth naming in a report.
_REASONS = {
    0x1: "idle",
    0x4: "sw power cap",
    0x8: "hw slowdown",
    0x20: "sw thermal",
    0x40: "hw thermal",
    0x80: "hw power brake",
}


def _device_selector(device_index: int) -> list[str]:
    """nvidia-smi's -i argument for a torch CUDA device (its UUID, since
    CUDA_VISIBLE_DEVICES may renumber devices), or nothing when torch cannot tell."""
    import torch

    uuid = getattr(torch.cuda.get_device_properties(device_index), "uuid", None)
    return ["-i", f"GPU-{uuid}"] if uuid else []


class GpuMonitor:
    """Background nvidia-smi sampling (every `interval_ms`) of one CUDA device.

    Without nvidia-smi every state is None, so benchmarks still run where it is missing.
    """

    def __init__(self, device_index: int = 0, interval_ms: int = 100):
        self._samples: list[tuple[float, float, float, float, int]] = []
        self._process = None
        if shutil.which("nvidia-smi") is None:
            return
        command = [
            "nvidia-smi",
            *_device_selector(device_index),
            f"--query-gpu={_FIELDS}",
            "--format=csv,noheader,nounits",
            f"-lms={interval_ms}",
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self._process.stdout:
            try:
                clock, power, temperature, reasons = (field.strip() for field in line.split(","))
                self._samples.append(
                    (time.monotonic(), float(clock), float(power), float(temperature), int(reasons, 16))
                )
            except ValueError:  # a header, a "[N/A]" or a partial line
                continue

    @staticmethod
    def now() -> float:
        return time.monotonic()

    def state_since(self, start: float) -> dict | None:
        """Median SM clock, median power, peak temperature and the union of the clock
        event reasons of the samples taken since `start` (None without samples)."""
        window = [sample for sample in self._samples if sample[0] >= start]
        if not window:
            return None
        reasons = 0
        for sample in window:
            reasons |= sample[4]
        return {
            "sm_clock_mhz": statistics.median(sample[1] for sample in window),
            "sm_clock_min_mhz": min(sample[1] for sample in window),
            "power_w": round(statistics.median(sample[2] for sample in window), 1),
            "temperature_c": max(sample[3] for sample in window),
            "clock_reasons": [name for bit, name in _REASONS.items() if reasons & bit],
            "samples": len(window),
        }

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait()
            self._process = None

    def __enter__(self) -> "GpuMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def describe(state: dict | None) -> str:
    """One short phrase for a printed table: 'SM 1755 MHz, 690 W, 71 C, sw power cap'."""
    if state is None:
        return "GPU state not recorded"
    reasons = ", ".join(name for name in state["clock_reasons"] if name != "idle")
    text = (
        f"SM {state['sm_clock_mhz']:.0f} MHz (min {state['sm_clock_min_mhz']:.0f}), "
        f"{state['power_w']:.0f} W, {state['temperature_c']:.0f} C"
    )
    return text + (f", {reasons}" if reasons else "")


def environment(device: torch.device) -> dict:
    """Date, command line, machine, device and the versions of torch, triton and FlashAttention (those installed)."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
    }
    if device.type == "cuda":
        info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
    for package in ("triton", "flash_attn_3", "fa3_fwd", "flash_attn"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return info
