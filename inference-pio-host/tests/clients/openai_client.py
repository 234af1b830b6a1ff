#!/usr/bin/env python3
"""`inference-pio serve` through the official `openai` Python client (CI runs this after the
Rust tests: `.ci/run` installs the client). Starts the server on a free loopback port with the
tiny Qwen3 fixture and checks: models.list; chat whole and streamed (with usage) equal to
`inference-pio run`'s greedy answer; log-probabilities whole and streamed; a `json_schema`
answer that parses and validates; tool_choice `required` and named on a model with a tool-call
format, whole and streamed; completions from token ids; the client's own error types
for an unknown model (404) and an unsupported setting (400); SIGTERM ends it with status 0.

Usage: openai_client.py PATH/TO/inference-pio
"""
import json
import pathlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import openai

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "plugins/qwen3-4b-instruct-2507/tests/fixtures/qwen3-tiny-a"


def full_vocabulary_moe(directory):
    """The tiny Qwen3-MoE fixture with Qwen3's whole vocabulary (its 512 embedding and head rows
    repeated to 151,936) and a 4,096-token context, so that chat prompts with tools and the
    tool-call tags fit it (served by the Qwen3-Coder plugin)."""
    import shutil
    import struct
    vocab = 151936
    fixture = ROOT / "plugins/qwen3-coder-30b/tests/fixtures/qwen3moe-tiny-a"
    config = json.loads((fixture / "config.json").read_text())
    config.update(vocab_size=vocab, max_position_embeddings=4096)
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(fixture / name, directory / name)
    raw = (fixture / "model.safetensors").read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    out_header, out = {}, bytearray()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        tensor, shape = data[begin:end], list(info["shape"])
        if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
            tensor = (tensor * (vocab // shape[0] + 1))[:vocab * (len(tensor) // shape[0])]
            shape[0] = vocab
        out_header[name] = {"dtype": info["dtype"], "shape": shape, "data_offsets": [len(out), len(out) + len(tensor)]}
        out += tensor
    head = json.dumps(out_header).encode()
    (directory / "model.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + bytes(out))


def start(binary, model, name):
    """`serve` of `model` as `name` on a free port, once its model is loaded: (process, base URL).
    The server listens while the model loads (/health 503), then answers 200."""
    server = subprocess.Popen([binary, "serve", "--model", str(model), "--served-model-name", name, "--port", "0"],
                              stderr=subprocess.PIPE, text=True)
    try:
        base = None
        for line in server.stderr:
            if "listening on " in line:
                base = line.split("listening on ")[1].split()[0]
                break
        assert base, "the server did not start"
        threading.Thread(target=lambda: [None for _ in server.stderr], daemon=True).start()
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    return server, base
            except urllib.error.HTTPError as e:
                assert e.code == 503, e
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)
    except BaseException:
        server.terminate()
        server.wait(timeout=30)
        raise


def tool_calls(binary):
    """tool_choice required and named on a model with a tool-call format: the answer is calls
    of the offered tools; streamed, the client's deltas add up to the whole answer."""
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
        full_vocabulary_moe(pathlib.Path(directory))
        server, base = start(binary, directory, "coder")
        try:
            client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
            tools = [{"type": "function", "function": {"name": "set_alarm", "description": "Sets an alarm", "parameters": {
                "type": "object", "properties": {"hour": {"type": "integer"}, "day": {"enum": ["mon", "tue"]}},
                "required": ["hour", "day"]}}}]
            messages = [{"role": "user", "content": "Wake me up on Monday at 7"}]
            for choice in ("required", {"type": "function", "function": {"name": "set_alarm"}}):
                answer = client.chat.completions.create(model="coder", messages=messages, tools=tools, tool_choice=choice,
                                                        max_tokens=1200, temperature=0)
                calls = answer.choices[0].message.tool_calls
                assert calls and answer.choices[0].finish_reason == "tool_calls", answer
                for call in calls:
                    args = json.loads(call.function.arguments)
                    assert call.function.name == "set_alarm" and isinstance(args["hour"], int) and args["day"] in ("mon", "tue"), call
            named = {"type": "function", "function": {"name": "set_alarm"}}
            whole = client.chat.completions.create(model="coder", messages=messages, tools=tools, tool_choice=named,
                                                   max_tokens=1200, temperature=0).choices[0].message.tool_calls[0]
            name, arguments = None, ""
            for chunk in client.chat.completions.create(model="coder", messages=messages, tools=tools, tool_choice=named,
                                                        max_tokens=1200, temperature=0, stream=True):
                for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                    name = delta.function.name or name
                    arguments += delta.function.arguments or ""
            assert (name, arguments) == (whole.function.name, whole.function.arguments), (name, arguments, whole)
            server.terminate()
            assert server.wait(timeout=30) == 0
        finally:
            server.terminate()
            server.wait(timeout=30)


def main():
    binary = sys.argv[1]
    server, base = start(binary, FIXTURE, "tiny")
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")

        assert [m.id for m in client.models.list().data] == ["tiny"]

        run = json.loads(subprocess.run([binary, "run", "--model", str(FIXTURE), "--prompt", "What is 2+2?", "--greedy",
                                         "--max-new-tokens", "12", "--json"], check=True, capture_output=True, text=True).stdout)
        messages = [{"role": "user", "content": "What is 2+2?"}]
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
        assert answer.choices[0].message.content == run["text"], (answer, run["text"])
        assert answer.usage.completion_tokens == 12 and answer.choices[0].finish_reason == "length"

        pieces, usage = [], None
        for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                usage = chunk.usage
        assert "".join(pieces) == run["text"], (pieces, run["text"])
        assert usage is not None and usage.total_tokens == answer.usage.total_tokens

        completion = client.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=5, temperature=0)
        assert completion.usage.completion_tokens == 5 and isinstance(completion.choices[0].text, str)

        try:
            client.chat.completions.create(model="nope", messages=messages)
            raise AssertionError("an unknown model was accepted")
        except openai.NotFoundError as e:
            assert "nope" in str(e)
        # n choices with a seed: choice i is what a single request seeded seed + i gets.
        several = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0, seed=3, n=2,
                                                 frequency_penalty=0.5)
        assert [c.index for c in several.choices] == [0, 1], several
        for i, choice in enumerate(several.choices):
            alone = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=1.0, seed=3 + i,
                                                   frequency_penalty=0.5)
            assert choice.message.content == alone.choices[0].message.content, (i, choice, alone)
        try:
            client.chat.completions.create(model="tiny", messages=messages, n=17)
            raise AssertionError("n=17 was accepted")
        except openai.BadRequestError as e:
            assert "`n`" in str(e)
        # Log-probabilities, whole and streamed: greedy tokens are the most likely of theirs.
        scored = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                logprobs=True, top_logprobs=2)
        content = scored.choices[0].logprobs.content
        assert len(content) == 6 and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token
                                         and t.logprob <= 0 for t in content), content
        streamed = [t for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                                 logprobs=True, top_logprobs=2, stream=True)
                    if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.content]
        assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content], (streamed, content)
        # json_schema (strict): the random tiny model's answer parses and validates.
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                  "required": ["ok", "n"], "additionalProperties": False}
        shaped = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                                response_format={"type": "json_schema",
                                                                 "json_schema": {"name": "answer", "strict": True, "schema": schema}})
        value = json.loads(shaped.choices[0].message.content)
        assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9, value
        try:
            client.chat.completions.create(model="tiny", messages=messages, response_format={"type": "json_schema",
                                           "json_schema": {"name": "big", "schema": {"type": "object", "description": "x" * 70000}}})
            raise AssertionError("a schema past the grammar budget was accepted")
        except openai.BadRequestError as e:
            assert "grammar budget" in str(e)
        # SIGTERM: a graceful shutdown exits 0.
        server.terminate()
        assert server.wait(timeout=30) == 0, f"exit status {server.returncode} after SIGTERM"
        tool_calls(binary)
        print("openai client: models, chat (whole, streamed, n choices, penalties, logprobs, json_schema, tool_choice required "
              "and named, streamed tool calls), completions, errors and SIGTERM ok")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
