"""Bit packing of integer codes: `pack(codes, bits)` and `unpack(packed, bits, numel)`.

A code is a signed integer that fits in `bits` bits as two's complement, i.e. lies in
[-2^(bits-1), 2^(bits-1) - 1], except at one bit, where a code is a sign, -1 or +1 (stored as bit 0 and bit 1):
a one-bit two's complement {-1, 0} is no quantizer's grid. That covers every quantizer of `dq_lightning.quant`:

- binary codes {-1, 1} at 1 bit, eight to a byte;
- ternary (TWN, TBT) codes {-1, 0, 1} at 2 bits, four to a byte;
- symmetric min-max codes in [-(2^(b-1) - 1), 2^(b-1) - 1];
- LSQ codes in [-2^(b-1), 2^(b-1) - 1].

Codes are laid out as one little-endian bit stream: code i occupies bits [i * bits, (i + 1) * bits) of the
stream, and byte j holds stream bits [8j, 8j + 8). With 2 bits that is four codes per byte, with 4 bits two,
with 3 bits eight codes in three bytes, with 1 bit eight, with 8 bits one code per byte (the int8 value itself).
The stream is padded with zero bits to a whole group (the least common multiple of `bits` and 8 bits), so a
packed tensor holds `ceil(numel / codes_per_group) * bytes_per_group` bytes: for the supported widths 1, 2, 3, 4
and 8, at most two bytes more than `numel * bits / 8`.

Both directions are vectorized (one int64 per group) and exact: `unpack(pack(c, b), b, c.numel())` equals `c`
for every code in range; a code out of range is refused, never wrapped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MAX_BITS = 8
_CHUNK_GROUPS = 1 << 20


def code_range(bits: int) -> tuple[int, int]:
    """The smallest and largest code `bits` bits hold (two's complement; at one bit the signs -1 and +1, and
    no zero)."""
    _check_bits(bits)
    if bits == 1:
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_layout(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one packing group: the shortest run of codes that fills whole bytes."""
    _check_bits(bits)
    group_bits = math.lcm(bits, 8)
    return group_bits // bits, group_bits // 8


def packed_numel(numel: int, bits: int) -> int:
    """Bytes that `pack` writes for `numel` codes of `bits` bits."""
    codes_per_group, bytes_per_group = group_layout(bits)
    return -(-numel // codes_per_group) * bytes_per_group


def pack(codes: Tensor, bits: int) -> Tensor:
    """Integer `codes` (any shape and integer or integral float dtype) -> a flat uint8 tensor of
    `packed_numel(codes.numel(), bits)` bytes. Raises ValueError for a code that `bits` bits cannot hold."""
    low, high = code_range(bits)
    flat = codes.detach().reshape(-1)
    if flat.is_floating_point():
        if not torch.equal(flat, flat.round()):
            raise ValueError("pack needs integer codes; got non-integral values")
    elif flat.dtype == torch.bool or flat.is_complex():
        raise ValueError(f"pack needs integer codes, got dtype {flat.dtype}")
    flat = flat.to(torch.int64)
    if flat.numel() and (int(flat.min()) < low or int(flat.max()) > high):
        raise ValueError(f"codes in [{int(flat.min())}, {int(flat.max())}] do not fit in {bits} bits "
                         f"(two's complement range [{low}, {high}])")
    if bits == 8:
        return flat.to(torch.int8).view(torch.uint8).clone()
    if bits == 1:
        if bool((flat == 0).any()):
            raise ValueError("1-bit codes are signs, -1 or +1; got a 0")
        flat = (flat > 0).to(torch.int64)  # the sign bit: 1 for +1, 0 for -1
    codes_per_group, _ = group_layout(bits)
    step = codes_per_group * _CHUNK_GROUPS  # bounded int64 temporaries for large matrices
    return torch.cat([_pack_chunk(flat[start:start + step], bits) for start in range(0, flat.numel(), step)]
                     or [torch.zeros(0, dtype=torch.uint8)])


def _pack_chunk(flat: Tensor, bits: int) -> Tensor:
    codes_per_group, bytes_per_group = group_layout(bits)
    groups = -(-flat.numel() // codes_per_group)
    padded = torch.zeros(groups * codes_per_group, dtype=torch.int64)
    padded[: flat.numel()] = flat & ((1 << bits) - 1)  # two's complement in the low `bits` bits
    shifts = torch.arange(codes_per_group, dtype=torch.int64) * bits
    words = (padded.view(groups, codes_per_group) << shifts).sum(dim=1)  # disjoint bits: sum == or
    byte_shifts = torch.arange(bytes_per_group, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first `numel` codes of a `pack`ed uint8 tensor, as a flat int8 tensor (sign-extended). Raises
    ValueError when `packed` is not exactly the size `pack` writes for `numel` codes."""
    _check_bits(bits)
    if packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError(f"packed codes must be uint8 (or int8 at 8 bits), got {packed.dtype}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel={numel!r} must be a non-negative integer")
    expected = packed_numel(numel, bits)
    flat = packed.reshape(-1).view(torch.uint8)  # an int8 tensor is read as its bytes
    if flat.numel() != expected:
        raise ValueError(f"{flat.numel()} packed bytes cannot hold exactly {numel} codes of {bits} bits "
                         f"({expected} bytes expected)")
    if bits == 8:
        return flat.view(torch.int8).clone()
    codes_per_group, bytes_per_group = group_layout(bits)
    step = bytes_per_group * _CHUNK_GROUPS
    chunks = [_unpack_chunk(flat[start:start + step], bits) for start in range(0, flat.numel(), step)]
    return torch.cat(chunks)[:numel].clone() if chunks else torch.zeros(0, dtype=torch.int8)


def _unpack_chunk(flat: Tensor, bits: int) -> Tensor:
    codes_per_group, bytes_per_group = group_layout(bits)
    groups = flat.numel() // bytes_per_group
    byte_shifts = torch.arange(bytes_per_group, dtype=torch.int64) * 8
    words = (flat.to(torch.int64).view(groups, bytes_per_group) << byte_shifts).sum(dim=1)
    shifts = torch.arange(codes_per_group, dtype=torch.int64) * bits
    unsigned = ((words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if bits == 1:
        return (unsigned * 2 - 1).to(torch.int8)  # the sign bit back to -1 or +1
    signed = unsigned - ((unsigned >> (bits - 1)) << bits)  # sign-extend the top bit
    return signed.to(torch.int8)


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits={bits!r} must be an integer from 1 to {MAX_BITS}")
