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


def check_gpu_request(accelerator, devices, culprit: str, *, devices_culprit: str | None = None,
                      no_gpu_hint: str = "", too_few_hint: str = "") -> None:
    """Refuse GPUs (`trainer.accelerator` gpu or cuda) on a machine without them, or more than it has, as one
    `UserError` naming `culprit` (the setting that asked for a GPU) or `devices_culprit` (the one that asked for
    too many). Lightning's own refusal came after the teacher was loaded and the run folder created, as a
    traceback."""
    from dq_lightning.errors import UserError

    if str(accelerator or "").lower() not in ("gpu", "cuda"):
        return
    available, wanted = cuda_devices(), device_count(devices)
    if not available:
        raise UserError(f"{culprit} asks for a GPU, but this machine has none (torch.cuda.is_available() is "
                        f"False){no_gpu_hint}")
    if wanted is not None and wanted > available:
        raise UserError(f"{devices_culprit or culprit} asks for {wanted} GPUs, but this machine has "
                        f"{available}{too_few_hint}")
