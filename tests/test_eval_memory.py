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
