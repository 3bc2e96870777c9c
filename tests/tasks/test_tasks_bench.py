"""Slow checks: full glyph benchmark render time and episode sampling throughput.

Run with ``pytest -m slow tests/tasks/test_tasks_bench.py -s``.
"""

import time

import pytest
import torch

from tasks import EpisodeSampler, glyph_dataset


@pytest.mark.slow
def test_full_glyph_render_under_a_minute(tmp_path):
    start = time.perf_counter()
    data = glyph_dataset(cache_root=tmp_path)
    seconds = time.perf_counter() - start
    print(f"\nfull glyph render: {data.num_classes} classes, {len(data)} images, {seconds:.1f} s")
    assert data.num_classes >= 1000 and len(set(data.groups)) >= 10
    assert seconds < 60
    start = time.perf_counter()
    glyph_dataset(cache_root=tmp_path)
    print(f"cached load: {time.perf_counter() - start:.2f} s")


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, None])
def test_episode_sampling_throughput(threads):
    data = glyph_dataset()
    sampler = EpisodeSampler(data, "train", n_way=5, k_shot=1, q_query=15, seed=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or previous)
    try:
        sampler.sample(32)  # warm-up
        n_batches, start = 100, time.perf_counter()
        for _ in range(n_batches):
            sampler.sample(32)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous)
    rate = n_batches * 32 / seconds
    print(f"\n{threads or previous} thread(s), 5-way 1-shot 15-query, meta-batch 32: "
          f"{n_batches / seconds:.0f} meta-batches/s, {rate:.0f} episodes/s")
    assert rate > 200  # loose: shared CPUs; measured numbers are in the report
