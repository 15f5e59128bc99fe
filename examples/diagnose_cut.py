"""Drop-only completion loss (no merge, no fine-tune) on 8 held-out GSM8K problems for other 12-layer cuts
of SmolLM2-135M: last-n (17-28), block-influence (scored on 16 training problems) and last-n with 6 layers.

    .venv/bin/python examples/diagnose_cut.py
"""
import copy, torch
from gradprune_deploy.data import read_examples, tokenize_examples, CompletionCollator
from gradprune_deploy.loading import load_model_and_tokenizer
from gradprune_deploy.surgery import drop_layers
from gradprune_deploy.scorers import block_influence
from gradprune_deploy.selection import select_layers_to_drop
m, tok = load_model_and_tokenizer()
col = CompletionCollator(tok.pad_token_id)
evalb = col(tokenize_examples(read_examples(split="test", limit=8), tok, max_length=320))
train = [col(tokenize_examples(read_examples(limit=16), tok, max_length=320)[i:i+4]) for i in (0,4)]
def loss(model):
    with torch.no_grad(): return float(model(**evalb).loss)
bi = block_influence(m, train); bi_drop = select_layers_to_drop(bi, drop_count=12)
for name, drop in [("last-n", list(range(17, 29))), ("block-influence", bi_drop), ("last-n 6", list(range(23, 29)))]:
    print(name, drop, loss(drop_layers(copy.deepcopy(m), drop)), flush=True)
