"""PeakMemory counts what a block allocates above its starting level, not what was there before."""

from __future__ import annotations

import time

import torch

from eval.memory import PeakMemory


def test_peak_rss_counts_memory_held_during_the_block_only():
    before = torch.ones(20 * 2**20 // 4)  # 20 MiB already resident: not the block's
    with PeakMemory(interval=0.001) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, written so its pages are resident
        time.sleep(0.02)
        del block
    assert 56 * 2**20 <= peak.rss_bytes < 80 * 2**20
    assert peak.peak_bytes == peak.rss_bytes and peak.cuda_bytes == 0
    del before


def test_each_block_shows_its_own_peak_after_earlier_blocks_freed_theirs():
    """Freed heap memory stays resident for reuse; without handing it back, every block after the first reads ~0."""
    pinned = []

    def block(mib: int) -> float:
        with PeakMemory(interval=0.001) as peak:
            pieces = [torch.ones(16 * 1024) for _ in range(mib * 16)]  # 64 KiB each: heap, not mmap
            pinned.append(torch.ones(16 * 1024))  # above the pieces, so the heap cannot shrink from its top
            time.sleep(0.02)
            del pieces
        return peak.rss_bytes / 2**20

    first, expensive, cheap = block(48), block(48), block(4)
    assert first > 40 and expensive > 40 and cheap < 12
