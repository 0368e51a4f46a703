#!/usr/bin/env node
// Browser test: Debian's headless Chromium (SwiftShader provides WebGPU) drives the demo page
// served from 127.0.0.1, loads the tiny fixture on WebGPU and on the CPU fallback, checks both
// against the transformers greedy tokens, measures tokens/s, and saves screenshots.
// Chromium is spawned with exactly the flags of TOOLCHAIN.md and attached over CDP.
// Env: CHROMIUM (binary, default `chromium`), BITNET_BROWSER_OUT (default <repo>/target/browser-test).
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { serve } from './serve.mjs';

const root = resolve(fileURLToPath(new URL('../..', import.meta.url)));
const outDir = process.env.BITNET_BROWSER_OUT ?? join(root, 'target', 'browser-test');
const ref = JSON.parse(readFileSync(join(root, 'tests/fixtures/tiny/reference.json'), 'utf8'));
const prompts = ref.references.float32.prompts;

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.on('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

async function connect(port, proc) {
  const deadline = Date.now() + 60_000;
  let last;
  while (Date.now() < deadline) {
    if (proc.exitCode !== null) throw new Error(`chromium exited with ${proc.exitCode}`);
    try {
      return await chromium.connectOverCDP(`http://127.0.0.1:${port}`);
    } catch (e) {
      last = e;
      await new Promise((r) => setTimeout(r, 300));
    }
  }
  throw new Error(`could not attach to chromium: ${last?.message}`);
}

const failures = [];
function check(cond, msg) {
  if (!cond) failures.push(msg);
  console.log(`${cond ? 'ok  ' : 'FAIL'} ${msg}`);
}

mkdirSync(outDir, { recursive: true });
const { server, url } = await serve(root);
const userDir = mkdtempSync(join(tmpdir(), 'bitnet-chromium-'));
const port = await freePort();
const flags = [
  '--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-quic', `--user-data-dir=${userDir}`,
  '--enable-unsafe-webgpu', `--remote-debugging-port=${port}`, 'about:blank',
];
const chromiumBin = process.env.CHROMIUM ?? 'chromium';
const proc = spawn(chromiumBin, flags, { stdio: ['ignore', 'ignore', 'pipe'] });
proc.on('error', (e) => {
  console.error(e.code === 'ENOENT'
    ? `the browser test needs Chromium: \`${chromiumBin}\` was not found (install it, e.g. apt-get install chromium, or set CHROMIUM=/path/to/chrome)`
    : `could not start ${chromiumBin}: ${e.message}`);
  process.exit(1);
});
let stderr = '';
proc.stderr.on('data', (d) => { stderr = (stderr + d).slice(-20000); });
const results = { machine: process.env.BITNET_MACHINE ?? null, backends: {} };
let browser;
try {
  browser = await connect(port, proc);
  const context = browser.contexts()[0] ?? (await browser.newContext());
  // In every page: send the composed message and click Stop as soon as the first streamed
  // text shows (from inside the page: the CPU path of the tiny model can finish the whole
  // reply within a few milliseconds).
  await context.addInitScript(() => {
    window.sendThenStop = () => new Promise((resolve) => {
      const log = document.getElementById('messages');
      const obs = new MutationObserver(() => {
        const body = log.querySelector('.msg.assistant:last-child .body');
        if (body?.textContent.length) {
          obs.disconnect();
          document.getElementById('stop-btn').click();
          resolve();
        }
      });
      obs.observe(log, { childList: true, subtree: true, characterData: true });
      document.getElementById('send-btn').click();
    });
  });
  const page = await context.newPage();
  await page.setViewportSize({ width: 1100, height: 800 });
  const logs = [];
  page.on('console', (m) => logs.push(`[${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => logs.push(`[pageerror] ${e.message}`));

  await page.goto(`${url}/web/`);
  const adapter = await page.evaluate(async () => {
    const a = await navigator.gpu?.requestAdapter();
    return a ? { architecture: a.info?.architecture, vendor: a.info?.vendor, fallback: !!(a.info?.isFallbackAdapter ?? a.isFallbackAdapter) } : null;
  });
  console.log(`WebGPU adapter: ${JSON.stringify(adapter)}`);
  check(adapter !== null, 'navigator.gpu.requestAdapter() returns an adapter');

  for (const backend of ['webgpu', 'cpu']) {
    await page.goto(`${url}/web/?model=../tests/fixtures/tiny/&backend=${backend}&autoload=1`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.documentElement.dataset.state),
      null, { timeout: 180_000 });
    const state = await page.evaluate(() => document.documentElement.dataset.state);
    const status = await page.textContent('#status');
    check(state === 'ready', `${backend}: model loads (${status.trim()})`);
    if (state !== 'ready') continue;
    const info = await page.evaluate(() => window.bitnetDemo.model.info);
    check(info.backend === backend, `${backend}: backend reported as ${info.backend} on ${info.device}`);
    for (const p of prompts) {
      const tokens = await page.evaluate(([ids]) => window.bitnetDemo.generateTokens(ids, { maxTokens: 16, ignoreEos: true }), [p.input_ids]);
      check(JSON.stringify(tokens) === JSON.stringify(p.greedy_tokens), `${backend}: greedy tokens of ${p.name}${JSON.stringify(tokens) === JSON.stringify(p.greedy_tokens) ? '' : `: got ${tokens} want ${p.greedy_tokens}`}`);
    }
    // Speed: 200 greedy tokens after a 1-token prompt (best of 3).
    const speed = await page.evaluate(async () => {
      let best = null;
      for (let i = 0; i < 3; i++) {
        const r = await window.bitnetDemo.model.generateText([297], { maxTokens: 200, ignoreEos: true });
        if (!best || r.timings.tokensPerSecond > best.timings.tokensPerSecond) best = r;
      }
      return { tokensPerSecond: best.timings.tokensPerSecond, tokens: best.tokens.length };
    });
    console.log(`${backend}: ${speed.tokensPerSecond.toFixed(1)} tok/s (${speed.tokens} tokens)`);
    results.backends[backend] = { device: info.device, kernels: info.kernels, ...speed };

    // The UI itself: send a message, see streamed text and the speed, then screenshot.
    await page.fill('#prompt', 'Hello! What is BitNet?');
    await page.click('#send-btn');
    await page.waitForFunction(() => document.documentElement.dataset.state === 'generating', null, { timeout: 10_000 }).catch(() => {});
    await page.waitForFunction(() => document.documentElement.dataset.state === 'ready', null, { timeout: 120_000 });
    const meta = await page.textContent('.msg.assistant .meta').catch(() => null);
    check(!!meta && /tok\/s/.test(meta), `${backend}: chat reply with stats (${meta})`);
    const shot = join(outDir, `demo-${backend}.png`);
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}`);

    // Stop button: a long generation is stopped by the user.
    await page.click('#clear-btn');
    await page.evaluate(() => {
      document.getElementById('max-tokens').value = '4000';
      window.bitnetDemo.extraOptions = { ignoreEos: true };
    });
    await page.fill('#prompt', 'Tell me a long story.');
    await page.evaluate(() => window.sendThenStop());
    await page.waitForFunction(() => document.documentElement.dataset.state === 'ready', null, { timeout: 60_000 });
    const stopped = await page.textContent('.msg.assistant:last-child .meta').catch(() => '');
    // WebGPU on SwiftShader is slow enough that the stop always lands mid-reply.
    const want = backend === 'webgpu' ? /stopped/ : /stopped|length/;
    check(want.test(stopped), `${backend}: stop button ends generation (${stopped})`);

    // Stop, then send at once, twenty times: the next message never finds the model busy
    // with the stopped generation's last step.
    const loop = await page.evaluate(async () => {
      const log = document.getElementById('messages');
      const idle = () => new Promise((resolve) => {
        const t = setInterval(() => {
          if (document.documentElement.dataset.state === 'ready') { clearInterval(t); resolve(); }
        }, 5);
      });
      const errors = [];
      for (let i = 0; i < 20; i++) {
        document.getElementById('clear-btn').click();
        document.getElementById('prompt').value = `Story number ${i}, please.`;
        await window.sendThenStop();
        await idle();
        const err = log.querySelector('.msg.assistant.error');
        if (err) errors.push(err.textContent);
      }
      return { errors, status: document.getElementById('status').textContent };
    });
    check(loop.errors.length === 0, `${backend}: stop then send, 20 times, no error (${loop.errors[0] ?? loop.status})`);
  }
  // `auto` on a software adapter (SwiftShader) picks the CPU path and says why.
  {
    await page.goto(`${url}/web/?model=../tests/fixtures/tiny/&backend=auto&autoload=1`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.documentElement.dataset.state), null, { timeout: 120_000 });
    const info = await page.evaluate(() => window.bitnetDemo.model?.info ?? null);
    const software = !!adapter && (adapter.fallback || /swiftshader/i.test(`${adapter.architecture} ${adapter.vendor}`));
    if (software) {
      check(info?.backend === 'cpu' && /software fallback/.test(info?.fallbackReason ?? ''),
        `auto on a software adapter: the CPU, with the reason (${info?.backend}: ${info?.fallbackReason})`);
    } else {
      console.log(`auto: ${info?.backend} (${info?.fallbackReason}); the adapter is not a software one`);
    }
  }

  // Downloads and the cache (in the page's thread): a download cut off mid-file is an error that
  // caches nothing; a cached file that was truncated afterwards is detected, evicted and
  // downloaded again, and the model then generates the reference tokens.
  {
    const r = await page.evaluate(async ([ids]) => {
      const { BitNet, hasModelInCache, deleteCachedModel } = await import('/npm/src/index.js');
      const out = {};
      const broken = new URL('/__broken__/tests/fixtures/tiny/', location.href).href;
      try {
        await BitNet.load(broken, { backend: 'cpu' });
        out.brokenError = null;
      } catch (e) {
        out.brokenError = e.message;
      }
      out.brokenCached = await hasModelInCache(broken);
      const base = new URL('/tests/fixtures/tiny/', location.href).href;
      await deleteCachedModel(base);
      (await BitNet.load(base, { backend: 'cpu' })).dispose();
      out.cached = await hasModelInCache(base);
      const cache = await caches.open('bitnet-inference-models-v1');
      const full = await (await cache.match(`${base}model.safetensors`)).arrayBuffer();
      await cache.put(`${base}model.safetensors`, new Response(full.slice(0, 5000)));
      const m = await BitNet.load(base, { backend: 'cpu' });
      out.tokens = (await m.generateText(ids, { maxTokens: 16, ignoreEos: true })).tokens;
      m.dispose();
      const again = await (await cache.match(`${base}model.safetensors`)).arrayBuffer();
      out.restored = again.byteLength === full.byteLength;
      return out;
    }, [prompts[0].input_ids]);
    check(/download (failed|truncated)/.test(r.brokenError ?? '') && !r.brokenCached,
      `an interrupted download is an error and nothing is cached (${r.brokenError})`);
    check(r.cached, 'hasModelInCache after a load');
    check(JSON.stringify(r.tokens) === JSON.stringify(prompts[0].greedy_tokens) && r.restored,
      'a truncated cached file is detected and downloaded again; the reference tokens follow');
  }

  // The same with `storage: 'opfs'`: the files go to the origin private file system (not the
  // Cache API), a truncated OPFS file is detected and downloaded again, and deleting works.
  {
    const r = await page.evaluate(async ([ids]) => {
      const { BitNet, hasModelInCache, deleteCachedModel, listCachedModels } = await import('/npm/src/index.js');
      const out = {};
      const base = new URL('/tests/fixtures/tiny/', location.href).href;
      await deleteCachedModel(base);
      (await BitNet.load(base, { backend: 'cpu', storage: 'opfs' })).dispose();
      out.cached = await hasModelInCache(base);
      out.listed = (await listCachedModels()).filter((c) => c.url === base).map((c) => c.storage);
      const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(base)));
      const dirName = Array.from(digest, (x) => x.toString(16).padStart(2, '0')).join('').slice(0, 40);
      const top = await navigator.storage.getDirectory();
      const dir = await (await top.getDirectoryHandle('bitnet-inference-models-v1')).getDirectoryHandle(dirName);
      const fh = await dir.getFileHandle('model.safetensors');
      const full = (await fh.getFile()).size;
      const w = await fh.createWritable();
      await w.truncate(5000);
      await w.close();
      const m = await BitNet.load(base, { backend: 'cpu', storage: 'opfs' });
      out.tokens = (await m.generateText(ids, { maxTokens: 16, ignoreEos: true })).tokens;
      m.dispose();
      out.restored = (await (await dir.getFileHandle('model.safetensors')).getFile()).size === full;
      out.deleted = await deleteCachedModel(base);
      out.after = await hasModelInCache(base);
      return out;
    }, [prompts[0].input_ids]);
    check(r.cached && JSON.stringify(r.listed) === '["opfs"]', `opfs: the model is stored in OPFS only (${r.listed})`);
    check(JSON.stringify(r.tokens) === JSON.stringify(prompts[0].greedy_tokens) && r.restored,
      'opfs: a truncated stored file is detected and downloaded again; the reference tokens follow');
    check(r.deleted && !r.after, 'opfs: deleteCachedModel removes it');
  }

  // In the page's own thread (no worker): WebGPU with the embedding/head split into many
  // small shards (as a large model is split under the binding limit), and the weights cache.
  if (adapter) {
    const r = await page.evaluate(async ([ids]) => {
      const { BitNet, listCachedModels, deleteCachedModel } = await import('/npm/src/index.js');
      const m = await BitNet.load('/tests/fixtures/tiny/', { backend: 'webgpu', maxBindingBytes: 4096 });
      const out = [];
      for (const p of ids) out.push((await m.generateText(p, { maxTokens: 16, ignoreEos: true })).tokens);
      const backend = m.backend;
      m.dispose();
      const cached = (await listCachedModels()).map((c) => c.url);
      const deleted = await deleteCachedModel('/tests/fixtures/tiny/');
      const after = (await listCachedModels()).map((c) => c.url);
      return { backend, out, cached, deleted, after };
    }, [prompts.map((p) => p.input_ids)]);
    check(r.backend === 'webgpu', 'sharded: in-page model on webgpu');
    prompts.forEach((p, i) => check(JSON.stringify(r.out[i]) === JSON.stringify(p.greedy_tokens),
      `sharded (4 KiB bindings) webgpu: greedy tokens of ${p.name}`));
    check(r.cached.some((u) => u.endsWith('/tests/fixtures/tiny/')), `cache lists the loaded model (${r.cached})`);
    check(r.deleted && !r.after.some((u) => u.endsWith('/tests/fixtures/tiny/')), 'deleteCachedModel removes it');
  }
  // The page's default model (DEFAULT_MODEL_URL in web/app.js) on both backends: it loads,
  // chats, and its speed is recorded.
  for (const backend of adapter ? ['webgpu', 'cpu'] : ['cpu']) {
    await page.goto(`${url}/web/?backend=${backend}&autoload=1`);
    await page.waitForFunction(() => ['ready', 'error'].includes(document.documentElement.dataset.state), null, { timeout: 180_000 });
    const state = await page.evaluate(() => document.documentElement.dataset.state);
    check(state === 'ready', `default model on ${backend}: loads (${(await page.textContent('#status')).trim()})`);
    if (state !== 'ready') continue;
    const speed = await page.evaluate(async (n) => {
      const m = window.bitnetDemo.model;
      const r = await m.generateText('In the beginning', { maxTokens: n, ignoreEos: true });
      return { backend: m.backend, tokensPerSecond: r.timings.tokensPerSecond, text: r.text };
    }, backend === 'cpu' ? 128 : 8);
    check(speed.backend === backend && speed.text.length > 0, `default model on ${backend}: generates (${JSON.stringify(speed.text.slice(0, 40))})`);
    console.log(`default model, ${backend}: ${speed.tokensPerSecond.toFixed(1)} tok/s`);
    results.backends[`default-${backend}`] = speed;
    // SwiftShader runs this model at well under 1 tok/s: keep the WebGPU reply short.
    await page.evaluate((n) => { document.getElementById('max-tokens').value = String(n); }, backend === 'cpu' ? 64 : 6);
    await page.fill('#prompt', 'Tell me a fortune.');
    await page.click('#send-btn');
    await page.waitForFunction(() => document.querySelector('.msg.assistant .meta'), null, { timeout: 120_000 });
    await page.waitForFunction(() => document.documentElement.dataset.state === 'ready', null, { timeout: 120_000 });
    const shot = join(outDir, `demo-default-${backend}.png`);
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}`);
  }

  // The threaded CPU module on a cross-origin-isolated page: the fixture's greedy tokens on the
  // team of all cores (threads: 'auto'), and the default model's speed on 1 thread and on all.
  {
    const cores = await page.evaluate(() => navigator.hardwareConcurrency);
    const loadIsolated = async (model, threads) => {
      const q = `${model ? `model=${model}&` : ''}backend=cpu${threads ? `&threads=${threads}` : ''}&autoload=1`;
      await page.goto(`${url}/__isolated__/web/?${q}`);
      await page.waitForFunction(() => ['ready', 'error'].includes(document.documentElement.dataset.state), null, { timeout: 180_000 });
      const state = await page.evaluate(() => document.documentElement.dataset.state);
      const what = `isolated page, ${model ? 'fixture' : 'default model'}, threads ${threads ?? 'auto'}`;
      check(state === 'ready', `${what}: loads (${(await page.textContent('#status')).trim()})`);
      return state === 'ready' ? page.evaluate(() => window.bitnetDemo.model.info) : null;
    };
    const info = await loadIsolated('../tests/fixtures/tiny/', null);
    check(await page.evaluate(() => crossOriginIsolated), 'isolated page: crossOriginIsolated');
    if (info) {
      const want = Math.min(8, cores);
      check(info.threads === want, `isolated page: threads 'auto' runs ${want} threads (${info.threads}: ${info.threadsReason})`);
      for (const p of prompts) {
        const tokens = await page.evaluate(([ids]) => window.bitnetDemo.generateTokens(ids, { maxTokens: 16, ignoreEos: true }), [p.input_ids]);
        check(JSON.stringify(tokens) === JSON.stringify(p.greedy_tokens), `threaded CPU: greedy tokens of ${p.name}${JSON.stringify(tokens) === JSON.stringify(p.greedy_tokens) ? '' : `: got ${tokens} want ${p.greedy_tokens}`}`);
      }
    }
    // Measured, not asserted: prefill of a 128-token prompt and 128 decoded tokens, best of 3.
    const speeds = {};
    for (const threads of [1, cores > 1 ? Math.min(8, cores) : null].filter(Boolean)) {
      const i = await loadIsolated(null, threads);
      if (!i) continue;
      speeds[threads] = await page.evaluate(async () => {
        const m = window.bitnetDemo.model;
        const prompt = Array.from({ length: 128 }, (_, k) => 300 + ((k * 37) % 2000));
        let best = { prefill: 0, decode: 0 };
        for (let r = 0; r < 3; r++) {
          const t = (await m.generateText(prompt, { maxTokens: 128, ignoreEos: true })).timings;
          best = { prefill: Math.max(best.prefill, t.prefillTokensPerSecond), decode: Math.max(best.decode, t.tokensPerSecond) };
        }
        return best;
      });
      console.log(`default model, CPU, ${threads} thread(s), isolated page: prefill-128 ${speeds[threads].prefill.toFixed(1)} tok/s, decode ${speeds[threads].decode.toFixed(1)} tok/s`);
    }
    results.backends['cpu-threads'] = { cores, speeds };
  }

  // Local files: the demo's file picker with the fixture's files, on the CPU backend.
  {
    await page.goto(`${url}/web/`);
    const dir = join(root, 'tests/fixtures/tiny');
    const names = ['config.json', 'tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'model.safetensors'];
    await page.setInputFiles('#model-files', names.map((n) => join(dir, n)));
    await page.check('input[name=source][value=files]');
    await page.selectOption('#backend-select', 'cpu');
    await page.click('#load-btn');
    await page.waitForFunction(() => ['ready', 'error'].includes(document.documentElement.dataset.state), null, { timeout: 60_000 });
    const state = await page.evaluate(() => document.documentElement.dataset.state);
    check(state === 'ready', `local files: model loads (${(await page.textContent('#status')).trim()})`);
    if (state === 'ready') {
      const p = prompts[2];
      const tokens = await page.evaluate(([ids]) => window.bitnetDemo.generateTokens(ids, { maxTokens: 16, ignoreEos: true }), [p.input_ids]);
      check(JSON.stringify(tokens) === JSON.stringify(p.greedy_tokens), `local files: greedy tokens of ${p.name}`);
    }
  }
  const errors = logs.filter((l) => l.startsWith('[error]') || l.startsWith('[pageerror]'));
  if (errors.length) console.log(`page errors:\n${errors.join('\n')}`);
  writeFileSync(join(outDir, 'results.json'), JSON.stringify(results, null, 2));
  writeFileSync(join(outDir, 'console.log'), logs.join('\n'));
} catch (e) {
  failures.push(`browser test crashed: ${e.stack ?? e}`);
  console.error(e);
  console.error(`chromium stderr (tail):\n${stderr.slice(-3000)}`);
} finally {
  await browser?.close().catch(() => {});
  proc.kill('SIGTERM');
  server.close();
  setTimeout(() => { try { proc.kill('SIGKILL'); } catch { /* gone */ } }, 2000).unref();
  try { rmSync(userDir, { recursive: true, force: true }); } catch { /* busy */ }
}
if (failures.length) {
  console.error(`\n${failures.length} browser check(s) failed:\n- ${failures.join('\n- ')}`);
  process.exit(1);
}
console.log('\nbrowser test passed');
