"""The normal noise an NVIDIA GPU draws for ``torch.randn(..., device="cuda")``, computed on any machine.

torch's CUDA generator is curand's Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy
as 1, 2, 3", SC'11, Sec. 3.3) keyed by the seed; draw k of a call takes counter (offset, 0, k, 0), and
its first two 32-bit words become one normal by curand's Box-Muller transform: u = x 2^-32 + 2^-33,
v = (y 2^-32 + 2^-33) 2 pi, z = sqrt(-2 ln u) sin v. That is the first value of each thread's
``curand_normal4``, which is every value of a tensor no larger than the threads the GPU launches for it
(an SD latent of one image is). AUTOMATIC1111's "NV" noise source computes the same, with the offset
counting its calls per generator (0 for the starting noise, then 1, 2, ... for the sampler's steps), and
so does ``PhiloxGenerator`` here, in float64 as A1111 does, then rounded to float32: A1111's NV noise to
the bit, the GPU's to float32 round-off (its kernel uses fast single-precision sin and log).
"""

from __future__ import annotations

import numpy as np

#: Philox4x32's multipliers and Weyl key increments (Salmon et al. 2011, Table 2)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
_LOW = np.uint64(0xFFFFFFFF)
_32 = np.uint64(32)
#: curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI (the latter a float32 constant)
_INV = 2.0**-32
_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))


def philox4x32(counter: list[np.ndarray], key: tuple[int, int], rounds: int = 10) -> list[np.ndarray]:
    """Philox4x32-``rounds`` of the four 32-bit counter words (uint64 arrays holding 32-bit values) under
    the 32-bit key words; returns the four output words."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(rounds):
        p0, p1 = c0 * _M0, c2 * _M1  # 32 x 32 -> 64 bits: exact in uint64
        c0, c1, c2, c3 = (p1 >> _32) ^ c1 ^ k0, p1 & _LOW, (p0 >> _32) ^ c3 ^ k1, p0 & _LOW
        if r < rounds - 1:
            k0, k1 = (k0 + _W0) & _LOW, (k1 + _W1) & _LOW
    return [c0, c1, c2, c3]


class PhiloxGenerator:
    """``randn`` draws as torch's CUDA generator seeded with ``seed`` gives them (see the module), one
    offset per call."""

    def __init__(self, seed: int) -> None:
        seed = int(seed) % 2**64
        self.key = (seed & 0xFFFFFFFF, seed >> 32)
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        index = np.arange(n, dtype=np.uint64)
        zero = np.zeros(n, dtype=np.uint64)
        x, y, _, _ = philox4x32([zero + np.uint64(self.offset), zero, index, zero], self.key)
        self.offset += 1
        u = x.astype(np.float64) * _INV + _INV / 2
        v = y.astype(np.float64) * _INV_2PI + _INV_2PI / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32).reshape(shape)
