"""Run the IGIA probe on a tiny Llama and write the layer scores (run alone or under accelerate launch)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from accelerate import PartialState  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from gradprune_deploy.compress.finetune import TrainSettings, run_probe  # noqa: E402
from gradprune_deploy.data import read_examples, tokenize_examples  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402


def main(tokenizer_dir: str, per_device_batch: int, out: str) -> None:
    state = PartialState()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    features = tokenize_examples(
        read_examples(str(Path(__file__).resolve().parents[3] / "shared/data/sst2"), limit=48), tokenizer, max_length=96
    )
    settings = TrainSettings(
        batch_size=per_device_batch,
        learning_rate=1e-3,
        max_steps=8,
        warmup_ratio=0.0,
        lora_dropout=0.0,
        lora_r=4,
        seed=7,
        sampling="sequential",
    )
    record, stats = run_probe(tiny_model("llama", seed=3), features, tokenizer, settings, probe_steps=3)
    if state.is_main_process:
        Path(out).write_text(
            json.dumps(
                {"scores": record.scores().tolist(), "world_size": state.num_processes, "zero_gradient_steps": stats["zero_gradient_steps"]}
            )
        )


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
