"""Drives `bitnet serve` with the official OpenAI Python client: chat (plain and streamed)
and a text completion must succeed and agree. Usage: openai_client.py BASE_URL MODEL"""
import sys

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
print("ok", repr(text))
