"""The probe under `accelerate launch --config_file examples/accelerate/ddp.yaml` (2 CPU processes,
gloo DDP) gives the same layer scores as one process on the same global batches."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_probe_worker.py")
DDP_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate" / "ddp.yaml"


@pytest.mark.slow
def test_probe_scores_identical_under_ddp(smollm2_dir, tmp_path):
    bin_dir = Path(sys.executable).parent
    single, ddp = tmp_path / "single.json", tmp_path / "ddp.json"
    subprocess.run([sys.executable, str(WORKER), str(smollm2_dir), "4", str(single)], check=True, capture_output=True, timeout=300)
    # The shipped DDP config (distributed_type MULTI_GPU): with no CUDA device the processes use gloo on CPU.
    proc = subprocess.run(
        [str(bin_dir / "accelerate"), "launch", "--config_file", str(DDP_CONFIG), str(WORKER), str(smollm2_dir), "2", str(ddp)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = json.loads(single.read_text()), json.loads(ddp.read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["zero_gradient_steps"] == two["zero_gradient_steps"] == 1
    for a, b in zip(one["scores"], two["scores"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    assert sorted(range(6), key=lambda i: one["scores"][i]) == sorted(range(6), key=lambda i: two["scores"][i])
