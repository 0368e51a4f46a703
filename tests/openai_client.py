"""Drives `bitnet serve` with the official OpenAI Python client: chat (plain and streamed)
and a text completion must succeed and agree; log-probabilities, several choices, logit bias
and penalties, tool calls and the Batch API parse into the client's own types.
Usage: openai_client.py BASE_URL MODEL (the server started with --batch-dir)"""
import json
import sys
import time

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused")
messages = [{"role": "user", "content": "Hello!"}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
text = whole.choices[0].message.content
assert whole.choices[0].finish_reason in ("stop", "length"), whole
assert whole.usage.completion_tokens >= 1, whole.usage
streamed = ""
chunks = 0
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=8, temperature=0, stream=True
):
    chunks += 1
    if chunk.choices and chunk.choices[0].delta.content:
        streamed += chunk.choices[0].delta.content
assert chunks >= 2, chunks
assert streamed == text, (streamed, text)
comp = client.completions.create(model=model, prompt="Hello world", max_tokens=5, temperature=0)
assert comp.usage.completion_tokens == 5, comp.usage

# Log-probabilities and several choices, whole and streamed, in the client's types.
lp = client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, n=2,
    logprobs=True, top_logprobs=2, presence_penalty=0.5, frequency_penalty=0.5,
)
assert [c.index for c in lp.choices] == [0, 1], lp
for c in lp.choices:
    content = c.logprobs.content
    assert content and all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content), c
    assert content[0].top_logprobs[0].token == content[0].token, content[0]
assert lp.choices[0].message.content == lp.choices[1].message.content, lp
assert lp.usage.completion_tokens == 2 * len(lp.choices[0].logprobs.content), lp.usage
seen = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=4, temperature=0, logprobs=True, stream=True
):
    if chunk.choices and chunk.choices[0].logprobs and chunk.choices[0].logprobs.content:
        seen += [t.token for t in chunk.choices[0].logprobs.content]
assert seen == [t.token for t in lp.choices[0].logprobs.content], seen
comp = client.completions.create(
    model=model, prompt="Hello world", max_tokens=3, temperature=0, logprobs=2, n=2,
    logit_bias={"5": -100},
)
assert len(comp.choices) == 2 and comp.choices[1].index == 1, comp
l = comp.choices[0].logprobs
assert len(l.tokens) == len(l.token_logprobs) == len(l.top_logprobs) == len(l.text_offset), l
echo = client.completions.create(model=model, prompt="Hello world", max_tokens=3, temperature=0, echo=True)
assert echo.choices[0].text.startswith("Hello world"), echo

# Tool calls, whole and streamed.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                   "required": ["city"]}}}]
ask = [{"role": "user", "content": "Weather in Oslo?"}]
r = client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=200, temperature=0
)
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.type == "function" and call.function.name == "get_weather", call
assert isinstance(json.loads(call.function.arguments)["city"], str), call
streamed_args = ""
for chunk in client.chat.completions.create(
    model=model, messages=ask, tools=tools, tool_choice="required", max_tokens=200,
    temperature=0, stream=True,
):
    if chunk.choices and chunk.choices[0].delta.tool_calls:
        streamed_args += chunk.choices[0].delta.tool_calls[0].function.arguments
assert streamed_args == call.function.arguments, (streamed_args, call)

# The Batch API: upload, run, read the results.
lines = "\n".join(
    json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": model, "messages": messages, "max_tokens": 8, "temperature": 0}})
    for i in range(3)
)
f = client.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
assert f.purpose == "batch" and f.bytes == len(lines), f
b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
deadline = time.time() + 60
while b.status not in ("completed", "failed", "cancelled"):
    assert time.time() < deadline, b
    time.sleep(0.05)
    b = client.batches.retrieve(b.id)
assert b.status == "completed" and b.request_counts.completed == 3, b
rows = [json.loads(l) for l in client.files.content(b.output_file_id).text.splitlines()]
assert sorted(r["custom_id"] for r in rows) == ["r0", "r1", "r2"], rows
assert all(r["response"]["body"]["choices"][0]["message"]["content"] == text for r in rows), rows
assert any(x.id == b.id for x in client.batches.list()), "batch not listed"
print("ok", repr(text))
