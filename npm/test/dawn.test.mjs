// The WebGPU path on Dawn (the `webgpu` package) where Node has a hardware GPU: the tiny
// fixture against the transformers reference, as in the browser. Skipped without one (CI's
// lavapipe has no adapter Dawn accepts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import { BitNet } from '../src/index.js';
import { installDawn } from './dawn.mjs';

const FIXTURE = fileURLToPath(new URL('../../tests/fixtures/tiny/', import.meta.url));
const prompts = JSON.parse(readFileSync(FIXTURE + 'reference.json', 'utf8')).references.float32.prompts;
const adapter = await installDawn();

test('WebGPU on Dawn: greedy tokens and last-position logits match the reference', { skip: !adapter && 'no hardware WebGPU adapter' }, async () => {
  const m = await BitNet.load(FIXTURE, { backend: 'webgpu' });
  assert.equal(m.backend, 'webgpu');
  for (const p of prompts) {
    const out = await m.generateText(p.input_ids, { maxTokens: 16, ignoreEos: true });
    assert.deepEqual(out.tokens, p.greedy_tokens, p.name);
    const got = await m.logits(p.input_ids);
    let d = 0;
    for (let i = 0; i < got.length; i++) d = Math.max(d, Math.abs(got[i] - p.prefill_last_logits[i]));
    assert.ok(d <= 1e-3, `${p.name}: max |Δ| ${d}`);
  }
  m.dispose();
});
