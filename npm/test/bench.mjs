#!/usr/bin/env node
// Tokens/s of a model through the package's CPU path under Node (default: the tiny fixture),
// and the size of the package's .wasm. Usage: npm run bench [-- <model dir> [tokens]]
// (BITNET_KERNELS=scalar for the scalar kernels).
import { statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { BitNet } from '../src/index.js';

const dir = process.argv[2] ?? fileURLToPath(new URL('../../tests/fixtures/tiny/', import.meta.url));
const n = Number(process.argv[3] ?? 200);
const wasm = fileURLToPath(new URL('../pkg/bitnet_inference_bg.wasm', import.meta.url));
const t0 = performance.now();
const m = await BitNet.load(dir, { backend: 'cpu', kernels: process.env.BITNET_KERNELS, contextLength: n + 1 });
const loadSeconds = (performance.now() - t0) / 1000;
const bos = m.info.bosTokenId ?? 0;
const runs = [];
const reps = Number(process.env.BITNET_REPS ?? 5);
for (let i = 0; i < reps; i++) {
  const r = await m.generateText([bos], { maxTokens: Math.min(n, m.info.contextLength - 1), ignoreEos: true, yieldEvery: 1 });
  runs.push(r.timings.tokensPerSecond);
}
runs.sort((a, b) => b - a);
console.log(JSON.stringify({
  model: dir,
  backend: m.info.device,
  node: process.version,
  wasmBytes: statSync(wasm).size,
  tokens: Math.min(n, m.info.contextLength - 1),
  bestTokensPerSecond: Number(runs[0].toFixed(1)),
  medianTokensPerSecond: Number(runs[Math.floor(runs.length / 2)].toFixed(1)),
  loadSeconds: Number(loadSeconds.toFixed(2)),
  decodeBytesPerToken: m.info.decodeBytesPerToken,
  rssMB: Math.round(process.memoryUsage().rss / 1e6),
}, null, 2));
