"""The IGIA probe's accumulation on a tiny peft LoRA Llama, one process (plain tensors) or under
`torchrun --nproc_per_node 2` with FSDP2 (`fully_shard`, gloo on CPU), on the same global batches.

Usage: fsdp_probe_worker.py single|fsdp OUT.pt

The FSDP run does what finetune.run_probe / recovery_finetune do under accelerate's FSDP2: it shards a
`training_twin` of the model (LoRA pairs listed before sharding), reads the gradients with the probe's
own `read_gradients` + `accumulate` (the functions IGIAProbe calls), takes AdamW steps on the shards,
then gathers the trained LoRA into the plain model with `copy_trained` and merges it. Rank 0 writes
the layer scores, the top-p merge masks of every linear and the merged weights.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from gradprune_deploy.compress.distributed import copy_trained, is_sharded, training_twin  # noqa: E402
from gradprune_deploy.compress.finetune import TrainSettings, attach_lora  # noqa: E402
from gradprune_deploy.compress.igia.merge import top_p_mask  # noqa: E402
from gradprune_deploy.compress.igia.probe import ProbeRecord, accumulate, lora_pairs, read_gradients  # noqa: E402
from gradprune_deploy.compress.surgery import find_layer_stack  # noqa: E402
from tests.conftest import tiny_model  # noqa: E402

LAYERS, STEPS, GLOBAL_BATCH, SEQ, VOCAB, KEEP_TOP_P = 4, 5, 4, 16, 512, 0.3


def batches() -> list[torch.Tensor]:
    """The same global batches in both runs (equal lengths, no padding: the per-rank mean losses
    average to the global one exactly)."""
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (GLOBAL_BATCH, SEQ), generator=generator) for _ in range(STEPS)]


def build(fsdp: bool):
    """(plain model, the peft model that trains, its LoRA pairs)."""
    model = tiny_model("llama", seed=3, num_hidden_layers=LAYERS, vocab_size=VOCAB)
    settings = TrainSettings(lora_r=4, lora_dropout=0.0, seed=7)
    peft_model = attach_lora(training_twin(model) if fsdp else model, settings)
    pairs = lora_pairs(peft_model)  # listed before sharding, as IGIAProbe's are
    if fsdp:
        for layer in find_layer_stack(peft_model.get_base_model())[1]:
            fully_shard(layer)
        fully_shard(peft_model)
    return model, peft_model, pairs, settings


def probe(peft_model, pairs, rank: int, world: int) -> ProbeRecord:
    record = ProbeRecord(num_layers=LAYERS, totals={p.key: 0.0 for p in pairs}, factors={p.key: [] for p in pairs})
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    per_rank = GLOBAL_BATCH // world
    peft_model.train()
    for batch in batches():
        ids = batch[rank * per_rank : (rank + 1) * per_rank]
        peft_model(input_ids=ids, labels=ids).loss.backward()
        accumulate(record, read_gradients(pairs))
        optimizer.step()
        optimizer.zero_grad()
    return record


def main(mode: str, out: str) -> None:
    fsdp = mode == "fsdp"
    if fsdp:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if fsdp else (0, 1)
    torch.use_deterministic_algorithms(True)
    model, peft_model, pairs, settings = build(fsdp)
    grad_types = {type(p.lora_a).__name__ for p in pairs}
    record = probe(peft_model, pairs, rank, world)
    if fsdp:  # gather the trained LoRA into the plain model, as recovery_finetune does under FSDP
        assert not is_sharded(model)
        trained, peft_model = peft_model, attach_lora(model, settings)
        copy_trained(trained, peft_model)
    merged = peft_model.merge_and_unload()
    masks = {f"{layer}.{name}": top_p_mask(f, KEEP_TOP_P) for layer in range(LAYERS) for name, f in record.igia_for_layer(layer).items()}
    if rank == 0:
        torch.save(
            {
                "world_size": world,
                "param_types": sorted(grad_types),
                "scores": record.scores().tolist(),
                "informative_steps": record.informative_steps,
                "zero_gradient_steps": record.zero_gradient_steps,
                "masks": masks,
                "merged": {k: v.detach().clone() for k, v in merged.state_dict().items()},
                "merged_is_sharded": is_sharded(merged),
            },
            out,
        )
    if fsdp:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1], sys.argv[2])
