"""compress on a CUDA device: the paper's merge and distillation with the model on the GPU.

Found on an H100: Trainer moves the model to CUDA while the IGIA matrices and a distillation teacher
stayed on the CPU, so every merging or distilling arm failed (cuda:0 and cpu). Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from gradprune_deploy.cli import main
from gradprune_deploy.manifest import Manifest
from tests.conftest import SHARED_DATA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--distill"],
        ["--merge-criterion", "gblm"],
        ["--distill", "--teacher-dtype", "bfloat16", "--teacher-device", "cpu"],  # logits come back from the CPU each batch
        ["--dtype", "bfloat16"],
    ],
)
def test_compress_with_merge_on_cuda(tiny_llama_dir, tmp_path, extra):
    out = tmp_path / "ckpt"
    args = ["compress", "--model", str(tiny_llama_dir), "--data", str(SHARED_DATA / "sst2" / "train.jsonl")]
    args += ["--max-examples", "32", "--max-length", "64", "--batch-size", "4", "--max-steps", "3", "--probe-steps", "2"]
    args += ["--drop-layers", "2", "--out", str(out), "-q", *extra]
    assert main(args) == 0
    m = Manifest.read(out)
    assert len(m.layers_dropped) == 2 and m.merge.enabled and m.merge.merged_entries_total > 0
    assert m.merge.criterion == ("gblm" if "gblm" in extra else "igia")
    for stage in ("probe", "merge", "surgery", "finetune"):
        assert m.timings[f"{stage}_peak_mb"] > 0  # torch.cuda.max_memory_allocated per stage
