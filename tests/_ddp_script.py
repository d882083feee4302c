"""Trains a tiny model (no dropout) and saves its trainable weights; run plain or under torchrun.

Usage: _ddp_script.py OUT.pt TASK   (TASK: classification | causal-lm)
"""

import os
import sys

import torch

from _tiny import TinyCausalLM, TinyClassifier, causal_lm_data, classification_data, trainable_state
from leanfit.train import Trainer, distributed

out, task = sys.argv[1], sys.argv[2]
distributed.init_from_env()
torch.manual_seed(0)
if task == "classification":
    model, data = TinyClassifier(dropout=0.0), classification_data(n_train=45)  # 45 rows: the last batch (5) splits 3 + 2
else:
    model, data = TinyCausalLM(dropout=0.0), causal_lm_data(n_train=30)
trainer = Trainer(model, data, epochs=2, batch_size=8, lr=1e-2, progress=False)
result = trainer.fit()
if distributed.is_main():
    torch.save({"weights": trainable_state(model), "steps": result.steps,
                "world": distributed.world()[1], "test": trainer.evaluate("test")}, out)
# Leave without running gloo's C++ destructors: on exit they sometimes abort a peer
# ("terminate called without an active exception") after the work is done and saved.
if distributed.world()[1] > 1:
    torch.distributed.barrier()
sys.stdout.flush()
os._exit(0)
