"""SGLang's native API against a live demo server, shape for shape as SGLang 0.5 answers:
/generate (logprob triples, finish_reason objects, batches in SGLang's order, streamed events
with "index"), /server_info, /model_info, /get_load, /flush_cache and the route list. The prompt
logprob tests need the engine's SamplingParams.prompt_logprobs."""

from __future__ import annotations

import json
import threading

import httpx
import msgspec
import pytest

from pyllama4.outputs import CompletionOutput, TokenLogprob
from pyllama4.server import protocol as p
from pyllama4.server.asgi import HTTPError
from pyllama4.server.generate_batch import LogprobOptions, split
from pyllama4.server.generate_meta import logprob_fields

GREEDY = {"temperature": 0, "max_new_tokens": 4}
META_KEYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens"}


@pytest.fixture(scope="module")
def server(launch_server, tmp_path_factory):
    live = launch_server(tmp_path_factory.mktemp("native") / "server.log")
    yield live.base
    live.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server, timeout=120) as client:
        yield client


def generate(http: httpx.Client, **body) -> dict | list:
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, **body) -> list[dict]:
    events = []
    with http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def is_triple(t: list, *, text: bool) -> bool:
    logprob, token_id, token_text = t
    ok_text = isinstance(token_text, str) if text else token_text is None
    return (logprob is None or isinstance(logprob, float)) and isinstance(token_id, int) and ok_text


# ---- /generate: logprobs -------------------------------------------------------------------


def test_output_logprobs_are_sglang_triples(http):
    body = {"text": "The capital of France is", "sampling_params": GREEDY}
    plain = generate(http, **body)
    assert not {k for k in plain["meta_info"] if "logprob" in k}  # only when asked for
    out = generate(
        http, **body, return_logprob=True, top_logprobs_num=2, return_text_in_logprobs=True
    )
    meta = out["meta_info"]
    assert out["output_ids"] == plain["output_ids"]
    tokens = meta["output_token_logprobs"]
    assert [t[1] for t in tokens] == out["output_ids"]
    assert all(is_triple(t, text=True) and t[0] <= 0 for t in tokens)
    tops = meta["output_top_logprobs"]
    assert len(tops) == len(tokens) and all(len(top) == 2 for top in tops)
    for token, top in zip(tokens, tops, strict=True):
        assert all(is_triple(t, text=True) for t in top)
        assert top[0][1] == token[1] and top[0][0] == pytest.approx(token[0])  # greedy: the best
        assert top[0][0] >= top[1][0]
    # logprob_start_len -1 (SGLang's default): the last prompt token alone, never scored.
    prompt = http.post("/tokenize", json={"prompt": body["text"]}).json()["tokens"]
    last = meta["input_token_logprobs"]
    assert len(last) == 1 and last[0][:2] == [None, prompt[-1]] and isinstance(last[0][2], str)
    assert meta["input_top_logprobs"] == [None]


def test_logprob_texts_are_null_unless_asked_and_top_zero_has_no_tops(http):
    out = generate(http, text="Hello", sampling_params=GREEDY, return_logprob=True)
    meta = out["meta_info"]
    assert all(is_triple(t, text=False) for t in meta["output_token_logprobs"])
    assert meta["input_token_logprobs"][0][2] is None
    assert "output_top_logprobs" not in meta and "input_top_logprobs" not in meta


def test_logprob_start_len_past_the_prompt_is_a_400(http):
    r = http.post(
        "/generate", json={"input_ids": [1, 2, 3], "return_logprob": True, "logprob_start_len": 3}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logprob_start_len"


# ---- /generate: finish_reason and meta_info ------------------------------------------------


def test_finish_reasons_are_sglang_objects(http):
    long = generate(http, text="Once upon a time", sampling_params={**GREEDY, "max_new_tokens": 8})
    meta = long["meta_info"]
    assert META_KEYS | {"weight_version", "e2e_latency"} <= set(meta)
    assert meta["finish_reason"] == {"type": "length", "length": 8}
    assert meta["completion_tokens"] == len(long["output_ids"]) == 8
    assert meta["prompt_tokens"] > 0 and meta["e2e_latency"] >= 0
    # A stop token (the third greedy token): matched is its id.
    stop_id = long["output_ids"][2]
    by_id = generate(
        http, text="Once upon a time", sampling_params={**GREEDY, "stop_token_ids": [stop_id]}
    )
    assert by_id["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
    # A stop string: matched is the string.
    stop = long["text"][3:6]
    by_str = generate(
        http,
        text="Once upon a time",
        sampling_params={**GREEDY, "max_new_tokens": 8, "stop": [stop]},
    )
    assert by_str["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_eos_matches_the_eos_id(http):
    eos = generate(
        http, input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 1, "temperature": 0}
    )
    first = eos["output_ids"][0]  # made the EOS: the next greedy token must end the request
    out = generate(
        http,
        input_ids=[1, 2, 3],
        sampling_params={"temperature": 0, "max_new_tokens": 4, "stop_token_ids": [first]},
    )
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": first}
    assert isinstance(out["meta_info"]["finish_reason"]["matched"], int)


# ---- /generate: batches --------------------------------------------------------------------


def test_batch_answers_a_list_in_sglang_order(http):
    prompts = ["The sky is", "My favourite food is"]
    singles = [generate(http, text=t, sampling_params=GREEDY) for t in prompts]
    batch = generate(http, text=prompts, sampling_params={**GREEDY, "n": 2})
    assert isinstance(batch, list) and len(batch) == 4
    # SGLang's order: prompt by prompt, each prompt's n completions together.
    assert [b["text"] for b in batch] == [singles[0]["text"]] * 2 + [singles[1]["text"]] * 2
    assert len({b["meta_info"]["id"] for b in batch}) == 4
    ids = [http.post("/tokenize", json={"prompt": t}).json()["tokens"] for t in prompts]
    by_ids = generate(http, input_ids=ids, sampling_params=GREEDY)
    assert [b["output_ids"] for b in by_ids] == [s["output_ids"] for s in singles]


def test_batch_sampling_params_and_rids_per_prompt(http):
    sp = [{**GREEDY, "max_new_tokens": 2}, {**GREEDY, "max_new_tokens": 3}]
    out = generate(http, text=["a", "b"], sampling_params=sp, rid=["x", "y"])
    assert [o["meta_info"]["completion_tokens"] for o in out] == [2, 3]
    assert [o["meta_info"]["id"] for o in out] == ["x", "y"]
    one = generate(http, text="a", sampling_params={**GREEDY, "n": 2})
    assert isinstance(one, list) and len(one) == 2  # n > 1: a list, as SGLang
    logprobs = generate(http, text=["a", "b"], sampling_params=GREEDY, return_logprob=[True, False])
    assert "output_token_logprobs" in logprobs[0]["meta_info"]
    assert "output_token_logprobs" not in logprobs[1]["meta_info"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"text": ["a", "b"], "sampling_params": [GREEDY]}, "sampling_params"),
        ({"text": ["a"] * 300}, "text"),
        ({"text": ["a", "b", "c"], "sampling_params": {"n": 100}}, "text"),
        ({"input_ids": [[1, 2], 3]}, "input_ids"),
        ({"text": ["a", "b"], "rid": ["x"]}, "rid"),
        ({"text": ["a", "b"], "image_data": ["u"]}, "image_data"),
        ({"text": [], "sampling_params": GREEDY}, "text"),
    ],
)
def test_bad_batches_are_400s(http, body, param):
    r = http.post("/generate", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_batch_stream_events_carry_index(http):
    prompts = ["The sky is", "My favourite food is"]
    whole = generate(http, text=prompts, sampling_params={**GREEDY, "n": 2})
    events = stream(http, text=prompts, sampling_params={**GREEDY, "n": 2})
    assert {e["index"] for e in events} == {0, 1, 2, 3}
    for i, expected in enumerate(whole):
        mine = [e for e in events if e["index"] == i]
        assert mine[-1]["text"] == expected["text"]  # cumulative
        assert [e["meta_info"]["finish_reason"] for e in mine[:-1]] == [None] * (len(mine) - 1)
        assert mine[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 4}
    single = stream(http, text="The sky is", sampling_params=GREEDY)
    assert all("index" not in e for e in single)
    assert single[-1]["text"] == whole[0]["text"]


def test_streamed_logprobs_are_cumulative(http):
    body = {"text": "Hello", "sampling_params": GREEDY, "return_logprob": True}
    events = stream(http, **body)
    whole = generate(http, **body)["meta_info"]["output_token_logprobs"]
    assert events[-1]["meta_info"]["output_token_logprobs"] == whole
    lengths = [len(e["meta_info"]["output_token_logprobs"]) for e in events]
    assert lengths == sorted(lengths) and lengths[-1] == 4


# ---- the other native routes ---------------------------------------------------------------


def test_server_info_model_info_and_load(http):
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        assert {"served_model_name", "context_length", "max_total_num_tokens", "version"} <= set(
            info
        )
        state = info["internal_states"][0]
        assert {"num_running_reqs", "num_queue_reqs", "memory_usage"} <= set(state)
    for path in ("/model_info", "/get_model_info"):
        model = http.get(path).json()
        assert model["is_generation"] is True and model["model_path"] == "demo"
        assert model["has_image_understanding"] is False and "weight_version" in model
    (load,) = http.get("/get_load").json()
    assert load["dp_rank"] == 0 and load["num_reqs"] == 0
    assert 0 < load["num_pending_tokens"] <= load["num_tokens"]
    assert http.get("/health_generate").status_code == 200


def test_flush_cache_empties_the_prefix_cache(http):
    body = {"text": "word " * 200, "sampling_params": {"max_new_tokens": 1}}
    generate(http, **body)
    assert generate(http, **body)["meta_info"]["cached_tokens"] > 0
    for method in ("GET", "POST"):
        r = http.request(method, "/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.\n")
        assert generate(http, **body)["meta_info"]["cached_tokens"] == 0
    assert generate(http, **body)["meta_info"]["cached_tokens"] > 0


def test_flush_cache_refuses_while_a_request_runs(http, server):
    started = threading.Event()
    done = threading.Event()

    def run() -> None:
        sp = {"max_new_tokens": 400, "ignore_eos": True}
        with httpx.stream(
            "POST", server + "/generate", json={"text": "x", "sampling_params": sp, "stream": True}
        ) as r:
            for _ in r.iter_lines():
                started.set()
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert started.wait(120)
        r = http.post("/flush_cache")
        assert done.is_set() or r.status_code == 400  # a machine so slow it finished: no check
        if r.status_code == 400:
            assert "pending requests" in r.json()["error"]["message"]
    finally:
        thread.join(300)
    assert http.post("/flush_cache").status_code == 200


def test_openapi_lists_the_native_routes(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/server_info", "/model_info", "/get_load", "/get_server_info", "/generate"):
        assert path in paths
    assert {"get", "post"} <= set(paths["/flush_cache"])


# ---- batch splitting (no server) -----------------------------------------------------------


def decoded(**body) -> p.GenerateRequest:
    return msgspec.json.decode(msgspec.json.encode(body), type=p.GenerateRequest)


def test_split_one_prompt_or_a_batch():
    one = split(decoded(text="hi", image_data=["a", "b"]))
    assert not one.listed and one.items[0].images == ["a", "b"] and one.prompt_field == "text"
    batch = split(decoded(input_ids=[[1], [2, 3]], image_data=["a", ["b", "c"]], rid="r"))
    assert batch.listed and batch.prompt_field == "input_ids"
    assert [i.input_ids for i in batch.items] == [[1], [2, 3]]
    assert [i.images for i in batch.items] == [["a"], ["b", "c"]]
    assert [i.rid for i in batch.items] == ["r_0", "r_1"]
    n = split(decoded(text=["a", "b"], sampling_params=[{"n": 2}, {"n": 3}]))
    assert n.offsets() == [0, 2]
    with pytest.raises(HTTPError):
        split(decoded(text="hi", input_ids=[1]))


def test_input_logprob_triples_from_engine_entries():
    prompt = [7, 8, 9, 10]
    scored = [TokenLogprob(9, -1.5, [(9, -1.5), (3, -2.0)]), TokenLogprob(10, -0.5, [])]
    output = [TokenLogprob(4, -0.25, [(4, -0.25)])]
    c = CompletionOutput(0, ["x"], [4], output, "length", None, (0, 0))
    text_of = {7: "a", 8: "b", 9: "c", 10: "d", 3: "e", 4: "f"}.get
    fields = logprob_fields(c, LogprobOptions(1, 1, True), prompt, scored, text_of)
    assert fields == {
        "input_token_logprobs": [[None, 8, "b"], [-1.5, 9, "c"], [-0.5, 10, "d"]],
        "output_token_logprobs": [[-0.25, 4, "f"]],
        "input_top_logprobs": [None, [[-1.5, 9, "c"], [-2.0, 3, "e"]], None],
        "output_top_logprobs": [[[-0.25, 4, "f"]]],
    }
    last = logprob_fields(c, LogprobOptions(0, -1, False), prompt, [], lambda t: None)
    assert last["input_token_logprobs"] == [[None, 10, None]]
    assert "input_top_logprobs" not in last


# ---- /generate: prompt logprobs (the engine's SamplingParams.prompt_logprobs) ---------------


def test_input_logprobs_from_logprob_start_len(http):
    text = "The quick brown fox jumps over the lazy dog"
    ids = http.post("/tokenize", json={"prompt": text}).json()["tokens"]
    body = {"text": text, "sampling_params": GREEDY, "return_logprob": True}
    whole = generate(
        http, **body, logprob_start_len=0, top_logprobs_num=2, return_text_in_logprobs=True
    )["meta_info"]
    tokens, tops = whole["input_token_logprobs"], whole["input_top_logprobs"]
    assert [t[1] for t in tokens] == ids and len(tops) == len(ids)
    assert tokens[0][0] is None and tops[0] is None  # the first prompt token: never scored
    assert all(is_triple(t, text=True) and t[0] <= 0 for t in tokens[1:])
    assert all(len(top) == 2 and all(is_triple(t, text=True) for t in top) for top in tops[1:])
    # From position 3: SGLang's rule, that position's logprob is null too; the rest agree
    # with the whole prompt's (fp32 on the CPU: within 1e-4).
    part = generate(http, **body, logprob_start_len=3)["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in part] == ids[3:] and part[0][0] is None
    for mine, ref in zip(part[1:], tokens[4:], strict=True):
        assert mine[0] == pytest.approx(ref[0], abs=1e-4)


def test_input_logprobs_agree_with_output_logprobs(http):
    """A prompt that continues with a greedy completion scores those tokens as the completion
    did (fp32 on the CPU: within 1e-3)."""
    ids = http.post("/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    out = generate(http, input_ids=ids, sampling_params=GREEDY, return_logprob=True)
    generated = out["meta_info"]["output_token_logprobs"]
    again = generate(
        http,
        input_ids=ids + out["output_ids"],
        sampling_params={"max_new_tokens": 1},
        return_logprob=True,
        logprob_start_len=len(ids) - 1,
    )["meta_info"]["input_token_logprobs"]
    assert [t[1] for t in again[1:]] == out["output_ids"]
    for mine, ref in zip(again[1:], generated, strict=True):
        assert mine[0] == pytest.approx(ref[0], abs=1e-3)


def test_batch_input_logprobs_per_prompt(http):
    out = generate(
        http,
        input_ids=[[1, 2, 3, 4], [5, 6, 7]],
        sampling_params=GREEDY,
        return_logprob=True,
        logprob_start_len=[0, 1],
    )
    assert [t[1] for t in out[0]["meta_info"]["input_token_logprobs"]] == [1, 2, 3, 4]
    assert [t[1] for t in out[1]["meta_info"]["input_token_logprobs"]] == [6, 7]
