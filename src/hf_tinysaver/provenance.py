"""Where a results file comes from: library versions, hardware, dtype, threads and the exact command.

Every results JSON the library writes (`tinysaver evaluate`, `search`, `calibrate`'s `calibration.json`, `esn-train`,
`plan`, the benchmarks) carries the dict [`provenance`] returns under the one key `PROVENANCE_KEY`, so that a number
can be traced to what produced it.

Example:

```python
>>> from hf_tinysaver.provenance import PROVENANCE_KEY, provenance

>>> info = provenance(device="cpu", dtype="float32")
>>> sorted(info) == sorted(PROVENANCE_FIELDS)
True
>>> PROVENANCE_KEY
'provenance'
```
"""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from importlib import metadata
from typing import Any

PROVENANCE_KEY = "provenance"
PROVENANCE_FIELDS = (
    "hf_tinysaver",
    "torch",
    "transformers",
    "python",
    "device",
    "hardware",
    "dtype",
    "threads",
    "command",
)


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def library_version() -> str:
    """The version of the hf_tinysaver code that runs (the source's `TINYSAVER_VERSION`), else the installed
    distribution's."""
    try:
        from .models.configuration_tinysaver import TINYSAVER_VERSION
    except ImportError:  # this file loaded on its own, outside the package (benchmarks/gpu_serving_check.py)
        return _version("hf_tinysaver") or "unknown"
    return TINYSAVER_VERSION


def cpu_model() -> str:
    """The CPU's model name (from `/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_description(device: Any = None) -> str:
    """One line naming the hardware `device` runs on: the GPU's name, or the CPU model with the torch thread count."""
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


# The running `tinysaver` command, set by `hf_tinysaver.commands.main` (also when it is called in-process with an
# argument list, where `sys.argv` is the caller's).
_running_command: list[str] | None = None


@contextlib.contextmanager
def running_command(argv: list[str]) -> Iterator[None]:
    """Within the block, [`command_line`] (and so [`provenance`]) reports `argv` as the command."""
    global _running_command
    previous, _running_command = _running_command, list(argv)
    try:
        yield
    finally:
        _running_command = previous


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed, joined with shell quoting: `argv`, else the running `tinysaver` command, else
    `sys.argv`."""
    argv = list(argv if argv is not None else _running_command if _running_command is not None else sys.argv)
    if argv and os.path.basename(argv[0]) in ("__main__.py", "tinysaver"):
        argv[0] = "tinysaver"
    return shlex.join(argv)


def provenance(device: Any = None, dtype: Any = None, argv: list[str] | None = None) -> dict[str, Any]:
    r"""
    What produced a results file, for its `"provenance"` key.

    Args:
        device (`str` or `torch.device`, *optional*):
            Where the models ran; defaults to `"cpu"`.
        dtype (`str` or `torch.dtype`, *optional*):
            The models' parameter dtype; defaults to torch's default dtype.
        argv (`list[str]`, *optional*):
            The command; defaults to `sys.argv`.

    Returns:
        `dict`: `hf_tinysaver`, `torch`, `transformers` and `python` versions, `device`, `hardware` (GPU name, or CPU
        model and thread count), `dtype`, `threads` (torch's intra-op thread count) and `command`.
    """
    import torch

    device = torch.device(device) if device is not None else torch.device("cpu")
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    return {
        "hf_tinysaver": library_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "device": str(device),
        "hardware": hardware_description(device),
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "command": command_line(argv),
    }


def model_provenance(model: Any, argv: list[str] | None = None) -> dict[str, Any]:
    """[`provenance`] for a `torch.nn.Module`: its device and dtype are those of its first parameter."""
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    if parameter is None:
        return provenance(argv=argv)
    return provenance(device=parameter.device, dtype=parameter.dtype, argv=argv)


__all__ = [
    "PROVENANCE_FIELDS",
    "PROVENANCE_KEY",
    "command_line",
    "cpu_model",
    "hardware_description",
    "library_version",
    "model_provenance",
    "provenance",
    "running_command",
]
