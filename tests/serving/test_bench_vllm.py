"""`gradprune bench --backend vllm` on CPU: one server pair (dense and pruned SmolLM2), a handful
of requests through vLLM's own `bench serve` engine, 0 failures."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

import os  # noqa: E402

from serving.bench import BenchConfig, bench  # noqa: E402


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_bench_one_server_pair(smollm2_dir, pruned_smollm2_dir, tmp_path):
    report = bench(
        BenchConfig(
            dense=str(smollm2_dir),
            pruned=str(pruned_smollm2_dir),
            backend="vllm",
            input_len=16,
            output_len=4,
            num_prompts=2,
            runs=1,
            warmup=0,
            concurrency=2,
            num_requests=4,
            kv_cache_gib=1,
            max_model_len=256,
            out=str(tmp_path / "report"),
            plot=False,
        )
    )
    vllm = report["backends"]["vllm"]
    assert vllm["failed_requests"] == {"dense": 0, "pruned": 0}
    assert vllm["completed_requests"] == {"dense": 6, "pruned": 6}  # 2 at concurrency 1 + 4 at concurrency 2
    assert {"ttft_s", "tpot_s", "e2e_s", "output_tok_s", "output_tok_s_concurrent", "tpot_s_concurrent", "peak_rss_bytes"} <= set(
        vllm["metrics"]
    )
    for entry in vllm["metrics"].values():
        assert entry["dense"]["median"] > 0 and entry["pruned"]["median"] > 0
    # the whole server tree was sampled: API server + engine core + worker, well above one process
    assert vllm["metrics"]["peak_rss_bytes"]["dense"]["median"] > 1 * 2**30
    assert report["ideal"]["ratios"]["layers_only"] == pytest.approx(18 / 30)
    # no server process is left behind

    for info in vllm["servers"].values():
        assert not os.path.exists(f"/proc/{info['pid']}") or open(f"/proc/{info['pid']}/stat").read().split()[2] == "Z"
