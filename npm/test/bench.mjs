#!/usr/bin/env node
// Load time, prefill and decode tokens/s of a model through the package under Node (default:
// the tiny fixture), and the size of the package's .wasm.
// Usage: npm run bench [-- <model dir> [decode tokens] [prompt tokens]]
// BITNET_BACKEND=webgpu runs the WebGPU path on Dawn (the `webgpu` package; needs a GPU),
// BITNET_SUBGROUPS=0 without WebGPU subgroups, BITNET_KERNELS=scalar the CPU path's scalar
// kernels, BITNET_REPS the repeats (median, best).
import { statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BitNet } from '../src/index.js';
import { installDawn } from './dawn.mjs';

const dir = process.argv[2] ?? fileURLToPath(new URL('../../tests/fixtures/tiny/', import.meta.url));
const n = Number(process.argv[3] ?? 200);
const promptLen = Number(process.argv[4] ?? 0);
const backend = process.env.BITNET_BACKEND ?? 'cpu';
let adapter = null;
if (backend === 'webgpu') {
  adapter = await installDawn();
  if (!adapter) {
    console.error('BITNET_BACKEND=webgpu: Dawn found no hardware WebGPU adapter');
    process.exit(2);
  }
}
if (process.env.BITNET_LOAD_TIMING === '1') globalThis.BITNET_LOAD_TIMING = true;
const wasm = fileURLToPath(new URL('../pkg/bitnet_inference_bg.wasm', import.meta.url));
const phases = {};
const t0 = performance.now();
const m = await BitNet.load(dir, {
  backend,
  kernels: backend === 'cpu' ? process.env.BITNET_KERNELS : undefined,
  subgroups: process.env.BITNET_SUBGROUPS === '0' ? false : undefined,
  contextLength: Math.max(n, promptLen) + 2,
  onProgress: (p) => { phases[p.phase] ??= (performance.now() - t0) / 1000; },
});
const loadSeconds = (performance.now() - t0) / 1000;
const bos = m.info.bosTokenId ?? 0;
const reps = Number(process.env.BITNET_REPS ?? 5);
const stats = (xs) => {
  const s = [...xs].sort((a, b) => b - a);
  return { best: Number(s[0].toFixed(1)), median: Number(s[Math.floor(s.length / 2)].toFixed(1)) };
};
// A warm-up generation compiles every pipeline (WebGPU) before anything is timed.
await m.generateText([bos], { maxTokens: 8, ignoreEos: true });
const decode = [];
for (let i = 0; i < reps; i++) {
  const r = await m.generateText([bos], { maxTokens: Math.min(n, m.info.contextLength - 1), ignoreEos: true });
  decode.push(r.timings.tokensPerSecond);
}
let prefill = null;
if (promptLen > 0) {
  const vocab = m.info.config.vocab_size;
  const ids = Array.from({ length: promptLen }, (_, i) => (i * 7919 + 13) % vocab);
  const runs = [];
  for (let i = 0; i < reps; i++) {
    const r = await m.generateText(ids, { maxTokens: 1, ignoreEos: true });
    runs.push(r.timings.prefillTokensPerSecond);
  }
  prefill = stats(runs);
}
const d = stats(decode);
console.log(JSON.stringify({
  model: dir,
  backend: m.info.backend,
  device: adapter ?? m.info.device,
  node: process.version,
  wasmBytes: statSync(wasm).size,
  loadSeconds: Number(loadSeconds.toFixed(2)),
  readSeconds: Number((phases.load ?? 0).toFixed(2)),
  tokens: Math.min(n, m.info.contextLength - 1),
  bestTokensPerSecond: d.best,
  medianTokensPerSecond: d.median,
  promptTokens: promptLen || undefined,
  prefillTokensPerSecond: prefill ?? undefined,
  decodeBytesPerToken: m.info.decodeBytesPerToken,
  rssMB: Math.round(process.memoryUsage().rss / 1e6),
}, null, 2));
m.dispose();
