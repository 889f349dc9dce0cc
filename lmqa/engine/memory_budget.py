"""How much key/value memory a document may take: parsed from --max-memory,
or by default most of the memory free where the blocks will live. A
document whose cache is larger is read through a temporary context file
(context_stream.spill) with only its landmark keys and one piece of blocks
in memory; one too large even for that is refused before a long prefill
rather than killed by the OS half-way."""

from __future__ import annotations

import re

import torch

AUTO = "auto"
AUTO_SHARE = 0.8
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_budget(text: str) -> int | None:
    """Bytes from "512M", "4GiB", "1.5g" or a bare number of bytes (units are
    binary); None for "auto". Checked before any heavy work."""
    if text.strip().lower() == AUTO:
        return None
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (examples: 512M, 4GiB, 1.5G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def budget(limit: int | None, device: torch.device, offload: str) -> int:
    """limit from parse_budget; None: AUTO_SHARE of the free memory where the
    block keys/values live (host memory, or the GPU with offload=device)."""
    if limit is not None:
        return limit
    if device.type == "cuda" and offload == "device":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil  # installed with accelerate

        free = psutil.virtual_memory().available
    return int(free * AUTO_SHARE)
