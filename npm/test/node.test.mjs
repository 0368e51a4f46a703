// The package under Node 20 (CPU path, SIMD128 kernels): the tiny fixture against the
// transformers float32 reference, the tokenizer, the JS API shapes and its errors.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { BitNet, hubUrl, HF_ENDPOINT } from '../src/index.js';
import { initWasm, guard } from '../src/runtime.js';

const FIXTURE = fileURLToPath(new URL('../../tests/fixtures/tiny/', import.meta.url));
const ref = JSON.parse(readFileSync(FIXTURE + 'reference.json', 'utf8'));
const prompts = ref.references.float32.prompts;

let shared;
const model = () => (shared ??= BitNet.load(FIXTURE));

const maxAbsDiff = (a, b) => {
  assert.equal(a.length, b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

test('SIMD128 kernels match the scalar reference on random and odd shapes', async () => {
  const r = await BitNet.kernelSelfTest();
  assert.deepEqual(r.kernels, ['scalar', 'simd128']);
  assert.ok(r.cases >= 50, `only ${r.cases} cases`);
  assert.deepEqual(r.failures, []);
});

test('auto backend falls back to the CPU under Node and says why', async () => {
  const m = await model();
  assert.equal(m.backend, 'cpu');
  assert.equal(m.info.kernels, 'simd128');
  assert.match(m.info.fallbackReason, /navigator\.gpu/);
  assert.equal(m.info.config.vocab_size, 300);
  assert.deepEqual(m.info.eosTokenIds, [298, 299]);
});

test('greedy tokens match the float32 reference for every prompt', async () => {
  const m = await model();
  for (const p of prompts) {
    const out = await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true });
    assert.deepEqual(out.tokens, p.greedy_tokens, p.name);
    assert.equal(out.finishReason, 'length');
    assert.equal(out.usage.promptTokens, p.input_ids.length);
    assert.equal(out.usage.completionTokens, 16);
  }
});

test('a sink window generates past the context; bad windows are named', async () => {
  const m = await model();
  const ctx = m.info.config.max_position_embeddings;
  const out = await m.generateText([1, 2, 3], { maxTokens: ctx + 100, ignoreEos: true, window: 64, sinks: 4 });
  assert.equal(out.tokens.length, ctx + 100);
  assert.equal(out.finishReason, 'length');
  // Deterministic: the same request gives the same tokens.
  const again = await m.generateText([1, 2, 3], { maxTokens: ctx + 100, ignoreEos: true, window: 64, sinks: 4 });
  assert.deepEqual(again.tokens, out.tokens);
  await assert.rejects(m.generateText([1, 2], { window: ctx + 1 }), /exceed/);
  await assert.rejects(m.generateText([1, 2], { window: 1 }), /window/);
});

test('last-position logits match the reference to 1e-4', async () => {
  const m = await model();
  for (const p of prompts) {
    const got = await m.logits(p.input_ids);
    assert.ok(got instanceof Float32Array);
    const d = maxAbsDiff(got, p.prefill_last_logits);
    assert.ok(d <= 1e-4, `${p.name}: max |Δ| ${d}`);
  }
});

test('streaming yields one chunk per token, text included, and stops at EOS', async () => {
  const m = await model();
  const p = prompts[3];
  const chunks = [];
  for await (const c of m.generate(p.input_ids, { maxTokens: 16, ignoreEos: true })) chunks.push(c);
  assert.equal(chunks.length, 16);
  assert.deepEqual(chunks.map((c) => c.token), p.greedy_tokens);
  assert.ok(chunks.at(-1).done && !chunks[0].done);
  assert.equal(chunks.map((c) => c.text).join(''), m.decode(p.greedy_tokens));
  assert.ok(chunks.at(-1).timings.tokensPerSecond > 0);
  // With EOS honoured (the generation config's 298/299), generation ends at the first EOS
  // if the reference produces one, and never emits it.
  const eos = new Set([298, 299]);
  const cut = p.greedy_tokens.findIndex((t) => eos.has(t));
  const out = await m.generateText(p.input_ids, { maxTokens: 16 });
  assert.deepEqual(out.tokens, cut < 0 ? p.greedy_tokens : p.greedy_tokens.slice(0, cut));
});

test('tokenizer and chat template match the reference', async () => {
  const m = await model();
  for (const s of ref.tokenizer.strings) {
    assert.deepEqual(m.encode(s.text), s.ids_add_special_tokens_true);
    assert.deepEqual(m.encode(s.text, { addSpecialTokens: false }), s.ids_add_special_tokens_false);
    assert.equal(m.decode(s.ids_add_special_tokens_true), s.decoded_skip_special);
  }
  const chat = ref.tokenizer.chat;
  assert.equal(m.applyChatTemplate(chat.messages), chat.rendered);
  assert.deepEqual(m.tokenize({ messages: chat.messages }), chat.ids);
});

test('chat.completions.create: OpenAI shapes, streaming and not', async () => {
  const m = await model();
  const messages = [{ role: 'user', content: 'Hello' }];
  const full = await m.chat.completions.create({ messages, max_tokens: 8 });
  assert.equal(full.object, 'chat.completion');
  assert.equal(full.choices[0].message.role, 'assistant');
  assert.ok(['stop', 'length'].includes(full.choices[0].finish_reason));
  assert.equal(full.usage.total_tokens, full.usage.prompt_tokens + full.usage.completion_tokens);
  const ids = m.tokenize({ messages });
  const greedy = await m.generateText(ids, { maxTokens: 8 });
  assert.equal(full.choices[0].message.content, greedy.text);

  const stream = await m.chat.completions.create({ messages, max_tokens: 8, stream: true,
    stream_options: { include_usage: true } });
  let text = '';
  let last;
  let first = true;
  for await (const c of stream) {
    assert.equal(c.object, 'chat.completion.chunk');
    if (first) assert.equal(c.choices[0].delta.role, 'assistant');
    first = false;
    text += c.choices[0].delta.content ?? '';
    last = c;
  }
  assert.equal(text, greedy.text);
  assert.equal(last.choices[0].finish_reason, full.choices[0].finish_reason);
  assert.equal(last.usage.completion_tokens, full.usage.completion_tokens);
});

test('sampling: a seed makes it reproducible; stop strings cut the text', async () => {
  const m = await model();
  const o = { maxTokens: 12, temperature: 1.0, topP: 0.9, topK: 50, seed: 42, ignoreEos: true };
  const a = await m.generateText('Hello', o);
  const b = await m.generateText('Hello', o);
  assert.deepEqual(a.tokens, b.tokens);
  const c = await m.generateText('Hello', { ...o, seed: 43 });
  assert.notDeepEqual(a.tokens, c.tokens);
  const p = prompts[3];
  const text = m.decode(p.greedy_tokens);
  const stop = text.slice(2, 4);
  const out = await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true, stop: [stop] });
  assert.equal(out.finishReason, 'stop');
  assert.equal(out.text, text.slice(0, text.indexOf(stop)));
});

test('a stop string split across tokens is never streamed', async () => {
  const m = await model();
  const p = prompts[3];
  const full = m.decode(p.greedy_tokens);
  // A stop string whose first two characters end one token's text and the rest start the next.
  let stop = null;
  for (let k = 1; k < p.greedy_tokens.length && stop === null; k++) {
    const head = m.decode(p.greedy_tokens.slice(0, k));
    const chars = [...head];
    const rest = [...full.slice(head.length)];
    if (!full.startsWith(head) || chars.length < 3 || rest.length < 2) continue;
    const tail = chars.slice(-2).join('');
    if (tail.trim() === '') continue;
    const cand = tail + rest.slice(0, 2).join('');
    if (!cand.includes('\uFFFD') && full.indexOf(cand) === head.length - tail.length) stop = cand;
  }
  assert.ok(stop, `no token boundary in ${JSON.stringify(full)}`);
  const before = full.slice(0, full.indexOf(stop));
  const chunks = [];
  for await (const c of m.generate(p.input_ids, { maxTokens: 16, ignoreEos: true, stop: [stop] })) {
    chunks.push(c);
  }
  assert.equal(chunks.map((c) => c.text).join(''), before, `stop ${JSON.stringify(stop)}`);
  assert.equal(chunks.at(-1).finishReason, 'stop');
});

test('AbortSignal stops a generation; the model stays usable', async () => {
  const m = await model();
  const p = prompts[2];
  const pre = new AbortController();
  pre.abort();
  await assert.rejects(m.generateText(p.input_ids, { signal: pre.signal }), { name: 'AbortError' });
  const ac = new AbortController();
  let n = 0;
  await assert.rejects(async () => {
    for await (const c of m.generate(p.input_ids, { maxTokens: 16, ignoreEos: true, signal: ac.signal })) {
      if (++n === 3) ac.abort();
    }
  }, { name: 'AbortError' });
  assert.equal(n, 3);
  const again = await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true });
  assert.deepEqual(again.tokens, p.greedy_tokens);
});

test('errors are rejected promises with clear messages', async () => {
  const m = await model();
  await assert.rejects(BitNet.load(FIXTURE, { backend: 'webgpu' }), /WebGPU is not available/);
  await assert.rejects(BitNet.load(FIXTURE, { backend: 'tpu' }), /backend` must be .auto., .webgpu. or .cpu. \(got "tpu"\)/);
  await assert.rejects(BitNet.load(FIXTURE, { backend: 'cpu', kernels: 'avx9' }), /kernels` must be .auto., .simd128. or .scalar. \(got "avx9"\)/);
  await assert.rejects(BitNet.load('/nonexistent/model/dir'), /config\.json/);
  const bytes = (n) => readFileSync(FIXTURE + n);
  await assert.rejects(BitNet.load({ 'config.json': bytes('config.json') }), /no \*\.safetensors/);
  const truncated = bytes('model.safetensors').subarray(0, 5000);
  await assert.rejects(
    BitNet.load({ 'config.json': bytes('config.json'), 'model.safetensors': truncated }),
    /model\.safetensors/,
  );
  await assert.rejects(m.generateText([]), /prompt is empty/);
  await assert.rejects(m.generateText([5000]), /out of range/);
  await assert.rejects(m.generateText(new Array(300).fill(5)), /context window holds 256/);
  await assert.rejects(m.generateText('hi', { temperature: -1 }), /temperature/);
  await assert.rejects(m.generateText('hi', { seed: -3 }), /seed/);
  // Still fine afterwards.
  const p = prompts[1];
  assert.deepEqual((await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true })).tokens, p.greedy_tokens);
});

test('options are checked strictly: unknown names and invalid values name the option', async () => {
  const m = await model();
  await assert.rejects(m.generateText('hi', { maxTokens: -5 }), /maxTokens.*positive integer/);
  await assert.rejects(m.generateText('hi', { maxToken: 5 }), /unknown generate option `maxToken`/);
  await assert.rejects(m.generateText('hi', { topP: 0 }), /topP/);
  await assert.rejects(m.generateText('hi', { stop: [''] }), /stop/);
  await assert.rejects(m.generateText([], {}), /prompt is empty/);
  await assert.rejects(m.generateText({ messages: [] }), /messages.*empty/);
  await assert.rejects(m.chat.completions.create({ messages: [] }), /messages.*empty/);
  await assert.rejects(BitNet.load(FIXTURE, { backend: 'gpu' }), /backend.*'auto', 'webgpu' or 'cpu'/);
  await assert.rejects(BitNet.load(FIXTURE, { contextLenght: 64 }), /unknown load option `contextLenght`/);
  await assert.rejects(BitNet.load(FIXTURE, { contextLength: 0 }), /contextLength/);
  // Valid options still work, undefined ones are skipped.
  const p = prompts[0];
  const out = await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true, seed: undefined });
  assert.deepEqual(out.tokens, p.greedy_tokens);
});

test('loading from bytes (as from File objects) and dispose', async () => {
  const names = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'model.safetensors'];
  const files = Object.fromEntries(names.map((n) => [n, new Uint8Array(readFileSync(FIXTURE + n))]));
  const events = [];
  const m = await BitNet.load(files, { backend: 'cpu', contextLength: 64, kernels: 'scalar',
    onProgress: (e) => events.push(e.phase) });
  assert.equal(m.info.kernels, 'scalar');
  assert.ok(events.includes('download') && events.at(-1) === 'ready');
  assert.equal(m.info.contextLength, 64);
  const p = prompts[2];
  assert.deepEqual((await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true })).tokens, p.greedy_tokens);
  m.dispose();
  await assert.rejects(m.generateText(p.input_ids), /disposed/);
});

test('hf:// loads from a Hub endpoint (its URL layout, the token sent there only); a 404 names the repo and file', async () => {
  const { createServer } = await import('node:http');
  const seen = [];
  const server = createServer((req, res) => {
    seen.push([req.url, req.headers.authorization]);
    const m = /^\/owner\/tiny\/resolve\/(main|v1)\/([\w.]+)$/.exec(req.url);
    let body;
    try {
      body = m && readFileSync(FIXTURE + m[2]);
    } catch {
      body = null;
    }
    res.writeHead(body ? 200 : 404, { 'content-length': body ? body.length : 0 });
    res.end(body ?? undefined);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const hfEndpoint = `http://127.0.0.1:${server.address().port}`;
  try {
    assert.equal(hubUrl('hf://a/b@v2/sub', 'http://h/').href, 'http://h/a/b/resolve/v2/sub/');
    assert.equal(hubUrl('hf://a/b').href, `${HF_ENDPOINT}/a/b/resolve/main/`);
    assert.throws(() => hubUrl('hf://a'), /not a Hub reference/);
    const m = await BitNet.load('hf://owner/tiny@v1', { backend: 'cpu', hfEndpoint, hfToken: 'secret' });
    const p = prompts[0];
    assert.deepEqual((await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true })).tokens, p.greedy_tokens);
    assert.ok(seen.some(([u]) => u === '/owner/tiny/resolve/v1/model.safetensors'));
    assert.ok(seen.every(([, a]) => a === 'Bearer secret'));
    m.dispose();
    await assert.rejects(BitNet.load('hf://owner/missing', { backend: 'cpu', hfEndpoint }),
      /owner\/missing\/resolve\/main\/config\.json: HTTP 404/);
  } finally {
    server.close();
  }
});

test('a Rust panic surfaces as an Error carrying its message', async () => {
  const wasm = await initWasm();
  await assert.rejects(guard(() => wasm.__panicForTests()), /panicked.*test panic/);
});

test('default model (models/kjv-fortunes): tokenizer and greedy tokens match transformers', async () => {
  const dir = fileURLToPath(new URL('../../models/kjv-fortunes/', import.meta.url));
  const kref = JSON.parse(readFileSync(
    fileURLToPath(new URL('../../tests/fixtures/kjv-fortunes/reference.json', import.meta.url)), 'utf8'));
  const m = await BitNet.load(dir);
  try {
    assert.equal(m.info.kernels, 'simd128');
    let decisive = 0;
    for (const g of kref.greedy) {
      assert.deepEqual(m.encode(g.prompt), g.input_ids, g.prompt);
      // Equal up to the reference's first non-decisive step (top1 − top2 margin < 0.25), as
      // the Rust test tests/kjv_fortunes.rs does.
      const n = g.tokens.length;
      let prefix = g.margins_top1_top2.findIndex((x) => x < 0.25);
      if (prefix < 0) prefix = n;
      decisive += prefix;
      const out = await m.generateText(g.input_ids, { maxTokens: n, ignoreEos: true });
      assert.deepEqual(out.tokens.slice(0, prefix), g.tokens.slice(0, prefix), g.prompt);
    }
    assert.ok(decisive >= 20, `only ${decisive} decisive steps`);
  } finally {
    m.dispose();
  }
});

test('structured output, logit bias and penalties: the same sampler as the server', async () => {
  const dir = fileURLToPath(new URL('../../models/kjv-fortunes/', import.meta.url));
  const m = await BitNet.load(dir);
  try {
    const schema = {
      type: 'object',
      properties: { name: { type: 'string', maxLength: 8 }, n: { type: 'integer', minimum: 0, maximum: 9 } },
      required: ['name', 'n'],
      additionalProperties: false,
    };
    const out = await m.generateText('And God said', { maxTokens: 40, temperature: 0.8, seed: 1, jsonSchema: schema });
    assert.equal(out.finishReason, 'stop', out.text);
    const v = JSON.parse(out.text);
    assert.ok(typeof v.name === 'string' && v.name.length <= 8 && Number.isInteger(v.n), out.text);
    const re = await m.generateText('And God said', { maxTokens: 20, regex: '[0-9]{3}' });
    assert.match(re.text, /^[0-9]{3}$/);
    const chat = await m.chat.completions.create({
      messages: [{ role: 'user', content: 'JSON please' }], max_tokens: 40,
      response_format: { type: 'json_schema', json_schema: { schema } },
    });
    JSON.parse(chat.choices[0].message.content);
    const plain = await m.generateText('And God said', { maxTokens: 3 });
    const forced = await m.generateText('And God said', { maxTokens: 3, logitBias: { [plain.tokens[0] + 1]: 100 } });
    assert.deepEqual(forced.tokens, Array(3).fill(plain.tokens[0] + 1));
    const pen = await m.generateText('And God said', { maxTokens: 3, presencePenalty: 1.5, frequencyPenalty: 1 });
    assert.equal(pen.tokens.length, 3);
    await assert.rejects(m.generateText('x', { regex: '(' }), /does not compile/);
    await assert.rejects(m.generateText('x', { jsonSchema: 'no' }), /jsonSchema/);
  } finally {
    m.dispose();
  }
});
