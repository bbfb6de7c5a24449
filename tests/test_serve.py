"""`accelc serve` over real HTTP (uvicorn on 127.0.0.1, an ephemeral port) with a tiny-llama artifact:
every endpoint, streaming, bad requests answered 4xx with a JSON body while the server stays
healthy, concurrent greedy requests decoding what they decode alone, a full queue (429), a
timeout (504), pinned workers, and a worker that dies (503)."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import TINY_RECIPE, write_recipe

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from accelc.serve.server import ServeOptions, running  # noqa: E402

MODEL = "art"  # the artifact folder's name: the model id the server serves


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from accelc.cli import main

    root = tmp_path_factory.mktemp("serve")
    body = TINY_RECIPE.format(model="tiny-llama", backends="[ort]", cache=root / "cache")
    assert main(["-q", "compile", str(write_recipe(root, body)), "-o", str(root / MODEL)]) == 0
    return root / MODEL


@pytest.fixture(scope="module")
def client(artifact):
    """An HTTP client of a server of one worker that batches up to 4 requests."""
    options = ServeOptions(workers=1, max_batch=4, max_queue=16)
    with running(artifact, options) as (_, url), httpx.Client(base_url=url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def worker_pid(client):
    return int(client.get("/health").json()["worker_pids"][0])


def reference(artifact, prompt: str, max_tokens: int) -> str:
    """What one greedy request decodes alone, through the artifact's plan on ORT (`accelc run`'s path)."""
    from accelc.loops.plan import run_plan
    from accelc.runtime.artifact import Artifact

    art = Artifact(artifact)
    ids = art.tokenizer(prompt)["input_ids"]
    target, draft = art.decode_pair("ort")
    result = run_plan(art.plan_for("ort"), target, draft, ids, max_tokens, eos_ids=art.eos_ids)
    return art.tokenizer.decode([t for t in result.tokens if t not in art.eos_ids], skip_special_tokens=True)


def complete(client, **body):
    return client.post("/v1/completions", json={"model": MODEL, **body})


def events(response) -> list:
    """The JSON payloads of a server-sent-event stream, which must end with [DONE]."""
    payloads = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_models_health_and_metrics(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["workers_alive"] == 1 and health["capacity"] == 4 + 16
    complete(client, prompt="hello", max_tokens=3)
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'accelc_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "accelc_workers_alive 1.0" in text and "accelc_generated_tokens_total" in text


def test_completion_is_the_greedy_continuation(client, artifact):
    body = complete(client, prompt="Once upon a time", max_tokens=12, temperature=0).json()
    assert body["object"] == "text_completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["text"] == reference(artifact, "Once upon a time", 12)
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 16, "completion_tokens": 12, "total_tokens": 28}


def test_streaming_sends_the_same_text(client):
    whole = complete(client, prompt="Streaming test", max_tokens=20).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Streaming test",
                                                         "max_tokens": 20, "stream": True}) as response:  # fmt: skip
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 9}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    with client.stream("POST", "/v1/chat/completions",
                       json={"model": MODEL, "messages": messages, "max_tokens": 9, "stream": True}) as response:  # fmt: skip
        chunks = events(response)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == chat["choices"][0]["message"]["content"]
    )


def test_a_stop_string_ends_the_text_before_it(client):
    text = complete(client, prompt="The stop test", max_tokens=24).json()["choices"][0]["text"]
    stop = text[5:7]
    stopped = complete(client, prompt="The stop test", max_tokens=400, stop=[stop]).json()["choices"][0]
    assert stopped["text"] == text[: text.index(stop)] and stopped["finish_reason"] == "stop"
    assert client.get("/health").json()["outstanding"] == 0  # the worker stopped decoding it


BAD = [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": MODEL}, 400, "prompt"),
    ({"model": MODEL, "prompt": 42}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "x" * 600, "max_tokens": 4}, 400, "max_tokens"),  # the context is 512
    ({"model": MODEL, "prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "n": 3}, 400, "n"),
    ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed"),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize(("body", "status", "param"), BAD)
def test_a_bad_completion_request_gets_a_4xx_json_error(client, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "robot", "content": "hi"}], [{"role": "user"}], [{"role": "user", "content": [{"type": "image"}]}]],
)
def test_a_bad_chat_request_gets_a_4xx_json_error(client, messages):
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


def test_fuzzed_requests_get_an_answer_or_a_json_4xx(client):
    """Any JSON body, from plausible to absurd, on either endpoint: 200, or a 4xx with an error body;
    never a 5xx, and the worker keeps serving."""
    from fuzzkit import examples
    from hypothesis import given
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=40)
    )
    json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.text(max_size=8), inner, max_size=3), max_leaves=8)  # fmt: skip
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                     "content": st.text(max_size=30) | json_values})  # fmt: skip
    fields = {
        "model": st.just(MODEL) | json_values,
        "prompt": st.text(max_size=60) | st.lists(st.text(max_size=10), max_size=2) | json_values,
        "messages": st.lists(message, max_size=3) | json_values,
        "max_tokens": st.integers(-3, 24) | json_values,
        "temperature": st.floats(-1, 3) | json_values,
        "top_p": st.floats(-0.5, 1.5) | json_values,
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5) | json_values,
        "n": st.integers(0, 3),
        "seed": st.integers(-(2**70), 2**70) | json_values,
    }
    bodies = st.fixed_dictionaries({}, optional=fields) | json_values

    @examples(40)
    @given(endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies)
    def case(endpoint, body):
        response = client.post(endpoint, json=body)
        assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
        if response.status_code != 200:
            assert response.json()["error"]["message"]

    case()
    assert client.get("/health").json()["status"] == "ok"
    assert complete(client, prompt="still fine", max_tokens=2).status_code == 200


def batch_sizes(client) -> tuple[float, float]:
    """(model calls, of which with one sequence) from /metrics."""
    lines = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line[0] != "#")
    return float(lines["accelc_batch_size_count"]), float(lines['accelc_batch_size_bucket{le="1.0"}'])


def test_concurrent_greedy_requests_decode_what_they_decode_alone(client, artifact, worker_pid):
    jobs = [(f"Request number {i} says" + " more" * i, 4 + 3 * i) for i in range(10)]
    alone = [reference(artifact, prompt, n) for prompt, n in jobs]
    calls, single = batch_sizes(client)
    os.kill(worker_pid, signal.SIGSTOP)  # all ten are queued before the worker decodes any: it must batch
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = [pool.submit(complete, client, prompt=p, max_tokens=n) for p, n in jobs]
            while client.get("/health").json()["outstanding"] < len(jobs):
                time.sleep(0.01)
            os.kill(worker_pid, signal.SIGCONT)
            answers = [a.result() for a in answers]
    finally:
        os.kill(worker_pid, signal.SIGCONT)
    assert [a.status_code for a in answers] == [200] * len(jobs)
    assert [a.json()["choices"][0]["text"] for a in answers] == alone
    calls_after, single_after = batch_sizes(client)
    assert calls_after - calls > single_after - single  # most calls held several sequences
    assert calls_after - calls < sum(n for _, n in jobs) - len(jobs)  # fewer calls than tokens decoded


def test_a_seed_makes_sampling_reproducible(client):
    sampled = [complete(client, prompt="Dice", max_tokens=12, temperature=1.0, seed=s).json() for s in (3, 3, 4)]
    texts = [s["choices"][0]["text"] for s in sampled]
    assert texts[0] == texts[1] != texts[2]


def test_pinned_workers_a_full_queue_a_timeout_and_a_dead_worker(artifact):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("two pinned workers need two cores")
    options = ServeOptions(workers=2, threads=1, max_batch=1, max_queue=0, timeout_s=1.5)
    with running(artifact, options) as (svc, url), httpx.Client(base_url=url, timeout=30) as client:
        pinned = [w.info["cores"] for w in svc.router.workers]
        assert pinned == [[cpus[0]], [cpus[1]]]  # each worker on its own core
        pids = [w.process.pid for w in svc.router.workers]
        for pid in pids:  # the workers stop decoding: admitted requests stay outstanding
            os.kill(pid, signal.SIGSTOP)
        try:
            with ThreadPoolExecutor(2) as pool:
                held = [pool.submit(complete, client, prompt="held", max_tokens=5) for _ in range(2)]
                while svc.router.outstanding < 2:
                    time.sleep(0.01)
                full = complete(client, prompt="one too many", max_tokens=5)
                assert full.status_code == 429 and full.json()["error"]["type"] == "rate_limit_exceeded"
                timed_out = [f.result() for f in held]
            assert [r.status_code for r in timed_out] == [504, 504]
            assert "timeout" in timed_out[0].json()["error"]["message"]
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        assert complete(client, prompt="after", max_tokens=3).status_code == 200
        assert client.get("/health").json()["status"] == "ok"

        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while client.get("/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["workers_alive"] == 1
        assert complete(client, prompt="still served", max_tokens=3).status_code == 200  # by the other worker


def test_a_missing_server_library_is_exit_3_naming_the_extra(cli, artifact, monkeypatch):
    from accelc.runtime.backends import Dependency
    from accelc.serve import server

    monkeypatch.setattr(server, "SERVER_DEPENDENCIES", (Dependency("no_such_asgi_server", server.SERVE.install, "x"),))
    code, _, err = cli("-q", "serve", artifact, "--port", "0")
    assert code == 3 and "pip install 'accelc[serve]'" in err


def test_ray_without_ray_is_exit_3_naming_the_extra(cli, artifact, monkeypatch):
    from accelc.runtime.backends import Dependency
    from accelc.serve import ray_router

    monkeypatch.setattr(ray_router, "RAY", Dependency("no_such_ray.serve", ray_router.RAY.install, "Ray Serve"))
    code, _, err = cli("-q", "serve", artifact, "--port", "0", "--ray")
    assert code == 3 and "pip install 'accelc[ray]'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--workers", "0"], "--workers 0 is below its minimum 1"), (["--workers", "999"], "lower --workers"),
     (["--max-batch", "0"], "--max-batch 0"), (["--timeout", "0"], "--timeout 0"),
     (["--host", "no.such.host.invalid"], "--host")],
)  # fmt: skip
def test_bad_serve_options_are_exit_2(cli, artifact, args, message):
    code, _, err = cli("-q", "serve", artifact, "--port", "0", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_the_same_workers_as_a_ray_serve_deployment(artifact):
    """`--ray`: a local Ray instance on loopback, the engine in a Serve replica, the same answers."""
    pytest.importorskip("ray.serve")
    jobs = [(f"Ray request {i}", 3 + 2 * i) for i in range(6)]
    alone = [reference(artifact, prompt, n) for prompt, n in jobs]
    options = ServeOptions(workers=1, max_batch=4, ray=True)
    with running(artifact, options) as (_, url), httpx.Client(base_url=url, timeout=60) as client:
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(lambda job: complete(client, prompt=job[0], max_tokens=job[1]), jobs))
        assert [a.json()["choices"][0]["text"] for a in answers] == alone
        stream = {"model": MODEL, "prompt": jobs[-1][0], "max_tokens": jobs[-1][1], "stream": True}
        with client.stream("POST", "/v1/completions", json=stream) as response:
            assert "".join(c["choices"][0]["text"] for c in events(response)) == alone[-1]
        assert complete(client, prompt="x" * 600, max_tokens=4).status_code == 400
        assert client.get("/health").json()["status"] == "ok"


def test_bench_serve_measures_every_split_of_the_cores(cli, artifact, tmp_path):
    from accelc.serve.tuning import splits

    out = tmp_path / "serve_bench.json"
    args = ("--concurrency", "2", "--max-batch", "2", "--new-tokens", "4", "--repeats", "1", "--json", out)
    code, stdout, err = cli("-q", "bench", artifact, "--serve", *args)
    assert code == 0, err
    result = json.loads(out.read_text())
    cores = len(os.sched_getaffinity(0))
    assert [(r["workers"], r["threads"]) for r in result["rows"]] == splits(cores)
    assert all(r["errors"] == 0 and r["identical"] and r["tok_s"] > 0 for r in result["rows"])
    assert f"--workers {result['best']['workers']} --threads {result['best']['threads']}" in stdout
