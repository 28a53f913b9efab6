"""How many GPUs this machine has and how many a `trainer.devices` value asks for: the CLI and the sweep's
up-front check refuse the same requests."""

from __future__ import annotations


def cuda_devices() -> int:
    import torch

    try:
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken driver is a machine without usable GPUs
        return 0


def device_count(devices) -> int | None:
    """How many devices a `trainer.devices` value asks for (None: "auto" or -1, whatever there is)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip().strip("[]")
    if "," in text:
        return len([part for part in text.split(",") if part.strip()])
    try:
        number = int(text)
    except ValueError:
        return None
    return None if number < 0 else number
