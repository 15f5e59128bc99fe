"""Diagnosis of the README main job's cut (SmolLM2-135M + GSM8K, 12 of 30 layers): completion loss on 8
held-out GSM8K problems for the dense model, for IGIA's cut with no merge and no fine-tune, and with the
same-sign merge at keep-top-p 0.2 and 0.05. Same probe settings as examples/quickstart.sh.

    .venv/bin/python examples/diagnose_merge.py
"""
import copy, torch, time
from gradprune_deploy.config import CompressConfig
from gradprune_deploy.data import read_examples, tokenize_examples, CompletionCollator
from gradprune_deploy.finetune import run_probe
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.pipeline import _train_settings, probe_length, merge_dropped_layers
from gradprune_deploy.selection import select_layers_to_drop
from gradprune_deploy.surgery import drop_layers
c = CompressConfig(out="x", drop_layers=12, max_examples=256, max_length=320, batch_size=4, grad_accum=2)
m, tok = load_model_and_tokenizer()
feats = tokenize_examples(read_examples(limit=256), tok, max_length=320)
s = _train_settings(c); steps, _ = probe_length(c, len(feats), s)
rec, _ = run_probe(m, feats, tok, s, probe_steps=steps)
scores = rec.scores(); dropped = select_layers_to_drop(scores, drop_count=12)
print("dropped", dropped, flush=True)
evalb = CompletionCollator(tok.pad_token_id)(tokenize_examples(read_examples(split="test", limit=8), tok, max_length=320))
def loss(model):
    with torch.no_grad(): return float(model(**evalb).loss)
print("dense", loss(m), flush=True)
a = drop_layers(copy.deepcopy(m), dropped); print("drop only", loss(a), flush=True)
for p in (0.2, 0.05):
    b = copy.deepcopy(m); st = merge_dropped_layers(b, rec, dropped, p); drop_layers(b, dropped); print("merge p", p, loss(b), flush=True)
# ratio of merged delta norm for layer 19 targets
print({k: round(v["linears"]["mlp.down_proj"]["delta_norm_ratio"],3) for k, v in st["per_layer"].items()})
