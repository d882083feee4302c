"""Trains the tiny classifier with checkpoints, for the kill-and-resume test (run as a subprocess).

usage: _train_script.py CHECKPOINT_DIR OUT.safetensors [--resume] [--sleep SECONDS]
"""

import argparse
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from _tiny import classification_data, trainable_state, TinyClassifier  # noqa: E402

from leanfit.train import Trainer  # noqa: E402

KILL_RUN = dict(epochs=3, batch_size=8, lr=1e-2, checkpoint_every=4, log_every=1, progress=False, seed=3)


def build() -> tuple[TinyClassifier, object]:
    torch.manual_seed(1234)
    return TinyClassifier(), classification_data()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint_dir")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()
    model, data = build()
    trainer = Trainer(model, data, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                      on_step=lambda t, step: time.sleep(args.sleep), **KILL_RUN)
    result = trainer.fit()
    save_file({n: t.contiguous() for n, t in trainable_state(model).items()}, args.out)
    print(f"steps={result.steps}")
