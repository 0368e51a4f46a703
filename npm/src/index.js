// bitnet-inference: BitNet b1.58 models in the browser (WebGPU, or WebAssembly SIMD128 on the
// CPU) and in Node (CPU). See index.d.ts for the API.
import {
  initWasm, initWasmThreads, threadsUnavailableReason, guard, toError, yieldToEventLoop, abortError, isNode,
} from './runtime.js';
import { gatherFiles, listCachedModels, deleteCachedModel, clearModelCache, hasModelInCache } from './files.js';
import { makeChat } from './chat.js';
import { checkGenerateOptions, checkLoadOptions, checkPrompt } from './options.js';

export { listCachedModels, deleteCachedModel, clearModelCache, hasModelInCache, initWasm };
export { hubUrl, HF_ENDPOINT } from './files.js';

/** Whether this environment exposes WebGPU (`navigator.gpu`). */
export function hasWebGPU() {
  return typeof navigator !== 'undefined' && !!navigator.gpu;
}

/** Matches the names of software (CPU-emulated) WebGPU adapters. */
const SOFTWARE_ADAPTER = /swiftshader|llvmpipe|lavapipe|software|warp/i;

/**
 * Why the browser's WebGPU adapter should not be used by `auto`: it is a software fallback
 * (SwiftShader and the like run the model hundreds of times slower than the CPU path); null
 * when it is a real GPU or there is none to ask (the engine then says why itself).
 */
async function softwareAdapterReason() {
  if (!hasWebGPU()) return null;
  let a;
  try {
    a = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
  } catch {
    return null;
  }
  if (!a) return null;
  const i = a.info ?? {};
  const label = [i.vendor, i.architecture, i.device, i.description].filter(Boolean).join(' ');
  if (i.isFallbackAdapter || a.isFallbackAdapter || SOFTWARE_ADAPTER.test(label)) {
    return `the WebGPU adapter is a software fallback (${label || 'isFallbackAdapter'}), slower than the CPU path; ask for backend: 'webgpu' to use it anyway`;
  }
  return null;
}

/**
 * The CPU path's threads: `threads` as asked (a number, or 'auto': one per core up to 8 where
 * the threaded module can run and the CPU path is certain), with why it is 1 when it is.
 */
function cpuThreads(asked = 'auto', backend) {
  if (asked === 1) return { threads: 1, threadsReason: 'threads: 1 was asked' };
  const cpuCertain = backend === 'cpu' || (backend === 'auto' && !hasWebGPU());
  const unavailable = threadsUnavailableReason();
  if (asked !== 'auto') {
    if (!cpuCertain) throw new RangeError(`load option \`threads\` (${asked}) needs backend: 'cpu' (the threaded module has no WebGPU)`);
    if (unavailable) throw new RangeError(`load option \`threads\` (${asked}): ${unavailable}`);
    return { threads: asked, threadsReason: null };
  }
  if (!cpuCertain) return { threads: 1, threadsReason: 'the WebGPU path was tried first (ask for backend: \'cpu\' to get threads)' };
  if (unavailable) return { threads: 1, threadsReason: unavailable };
  const cores = Math.min(8, globalThis.navigator?.hardwareConcurrency ?? 1);
  return cores > 1 ? { threads: cores, threadsReason: null } : { threads: 1, threadsReason: 'one core' };
}

function genOptions(o = {}) {
  const out = {};
  const keys = ['maxTokens', 'temperature', 'topK', 'topP', 'minP', 'repetitionPenalty', 'presencePenalty', 'frequencyPenalty', 'logitBias', 'jsonSchema', 'grammar', 'regex', 'seed', 'stop', 'ignoreEos', 'eosTokenIds', 'window', 'sinks'];
  for (const k of keys) if (o[k] !== undefined && o[k] !== null) out[k] = o[k];
  if (out.seed !== undefined && !(Number.isSafeInteger(out.seed) && out.seed >= 0)) {
    throw new RangeError('seed must be a non-negative integer');
  }
  return JSON.stringify(out);
}

/** A model loaded in this thread. Create with {@link BitNet.load}. */
export class BitNetModel {
  #m;
  #queue = Promise.resolve();
  #disposed = false;
  #name;

  constructor(raw, name) {
    this.#m = raw;
    this.#name = name;
    /** Backend, device, config and token ids (see ModelInfo). */
    this.info = JSON.parse(raw.info());
    this.chat = makeChat(this, () => this.#name);
  }

  /** 'webgpu' or 'cpu'. */
  get backend() {
    return this.info.backend;
  }

  #live() {
    if (this.#disposed) throw new Error('the model was disposed');
    return this.#m;
  }

  /** Runs `f` after every earlier call on this model has finished. */
  #exclusive(f) {
    const run = this.#queue.then(f, f);
    this.#queue = run.catch(() => {});
    return run;
  }

  encode(text, { addSpecialTokens = true } = {}) {
    try {
      return Array.from(this.#live().encode(String(text), addSpecialTokens));
    } catch (e) {
      throw toError(e);
    }
  }

  decode(ids, { skipSpecialTokens = true } = {}) {
    try {
      return this.#live().decode(Uint32Array.from(ids), skipSpecialTokens);
    } catch (e) {
      throw toError(e);
    }
  }

  applyChatTemplate(messages, { addGenerationPrompt = true } = {}) {
    try {
      return this.#live().applyChatTemplate(JSON.stringify(messages), addGenerationPrompt);
    } catch (e) {
      throw toError(e);
    }
  }

  /** Token ids of a prompt: a string (BOS added), ids as given, or `{ messages }` (chat template). */
  tokenize(input, opts = {}) {
    if (typeof input === 'string') return this.encode(input, { addSpecialTokens: opts.addSpecialTokens ?? true });
    if (Array.isArray(input) || ArrayBuffer.isView(input)) return Array.from(input);
    if (input && Array.isArray(input.messages)) {
      try {
        return Array.from(this.#live().encodeChat(JSON.stringify(input.messages)));
      } catch (e) {
        throw toError(e);
      }
    }
    throw new TypeError('prompt must be a string, token ids, or { messages }');
  }

  /**
   * Streams a generation: yields `{ text, token, done }` per token; the last chunk has
   * `done: true` with `finishReason`, `usage` and `timings`.
   */
  async *generate(input, opts = {}) {
    checkPrompt(input);
    checkGenerateOptions(opts);
    const signal = opts.signal;
    if (signal?.aborted) throw abortError(signal);
    // Take the model for the whole generation (later calls wait).
    let release;
    const held = new Promise((r) => { release = r; });
    const prev = this.#queue;
    this.#queue = prev.then(() => held);
    await prev;
    try {
      const m = this.#live();
      const ids = this.tokenize(input, opts);
      const o = genOptions(opts);
      try {
        m.start(Uint32Array.from(ids), o);
      } catch (e) {
        throw toError(e);
      }
      let n = 0;
      for (;;) {
        if (signal?.aborted) {
          try { m.cancel(); } catch { /* ignore */ }
          throw abortError(signal);
        }
        const r = JSON.parse(await guard(() => m.step()));
        const chunk = { text: r.text, token: r.token, done: r.done };
        if (r.done) {
          const decodeTok = Math.max(0, r.completionTokens - 1);
          chunk.finishReason = r.finishReason;
          chunk.promptTokens = r.promptTokens;
          chunk.completionTokens = r.completionTokens;
          chunk.usage = { promptTokens: r.promptTokens, completionTokens: r.completionTokens };
          chunk.timings = {
            prefillSeconds: r.prefillSeconds,
            decodeSeconds: r.decodeSeconds,
            tokensPerSecond: r.decodeSeconds > 0 ? decodeTok / r.decodeSeconds : 0,
            prefillTokensPerSecond: r.prefillSeconds > 0 ? r.promptTokens / r.prefillSeconds : 0,
          };
        }
        if (r.token !== null || r.done) yield chunk;
        if (r.done) return;
        // CPU steps finish synchronously: give the event loop (abort, UI) a turn now and then.
        if (++n % (opts.yieldEvery ?? 1) === 0) await yieldToEventLoop();
      }
    } finally {
      release();
    }
  }

  /** Runs a whole generation: `{ text, tokens, finishReason, usage, timings }`. */
  async generateText(input, opts = {}) {
    let text = '';
    const tokens = [];
    let last = null;
    for await (const c of this.generate(input, opts)) {
      text += c.text;
      if (c.token !== null) tokens.push(c.token);
      if (c.done) last = c;
    }
    return { text, tokens, finishReason: last.finishReason, usage: last.usage, timings: last.timings };
  }

  /** Logits (Float32Array, vocab_size) of the last position of a prompt run from position 0. */
  logits(input) {
    checkPrompt(input);
    return this.#exclusive(async () => {
      const ids = this.tokenize(input);
      return guard(() => this.#live().promptLogits(Uint32Array.from(ids)));
    });
  }

  /** Frees the model's memory (weights, caches, GPU buffers). */
  dispose() {
    if (this.#disposed) return;
    this.#disposed = true;
    const m = this.#m;
    this.#queue.then(() => m.free(), () => m.free());
  }

  [Symbol.dispose]() {
    this.dispose();
  }
}

export const BitNet = {
  /**
   * Loads a model. `source`: a model directory URL (config.json, model.safetensors[.index.json],
   * tokenizer.json, ...), a local path (Node), a FileList/File[], or `{ 'config.json': bytes, ... }`.
   */
  async load(source, opts = {}) {
    checkLoadOptions(opts);
    let backend = opts.backend ?? 'auto';
    const software = backend === 'auto' ? await softwareAdapterReason() : null;
    if (software) backend = 'cpu';
    const { threads, threadsReason } = cpuThreads(opts.threads, backend);
    const wasm = threads > 1 ? await initWasmThreads(threads) : await initWasm(opts.wasm);
    const files = await gatherFiles(source, opts);
    if (opts.signal?.aborted) throw abortError(opts.signal);
    const cacheWarning = await files.commit?.();
    if (cacheWarning) console.warn(`bitnet-inference: ${cacheWarning}`);
    const evict = files.evict;
    opts.onProgress?.({ phase: 'load', file: null, loaded: 0, total: 0 });
    const b = new wasm.ModelBuilder();
    const t0 = performance.now();
    try {
      for (const [name, bytes] of files) b.addFile(name, bytes);
      if (globalThis.BITNET_LOAD_TIMING) console.log(`load: files into wasm ${((performance.now() - t0) / 1000).toFixed(3)} s`);
    } catch (e) {
      b.free();
      await evict?.();
      throw toError(e);
    }
    files.length = 0; // let the JS copies go
    let raw;
    try {
      raw = await guard(() => b.build(JSON.stringify({
        backend,
        contextLength: opts.contextLength,
        subgroups: opts.subgroups,
        kernels: opts.kernels,
        maxBindingBytes: opts.maxBindingBytes,
        threads: threads > 1 ? threads : undefined,
      })));
    } catch (e) {
      // Files the engine rejects do not stay in the cache (the next load downloads them).
      if (!/WebGPU|memory/i.test(e?.message ?? '')) await evict?.();
      throw e;
    } finally {
      b.free();
    }
    const name = opts.name ?? (typeof source === 'string' || source instanceof URL ? String(source) : 'local');
    const model = new BitNetModel(raw, name);
    if (software) model.info.fallbackReason = software;
    if (model.info.backend === 'cpu') model.info.threadsReason = threadsReason;
    model.info.cacheWarning = cacheWarning ?? null;
    if (model.info.backend === 'webgpu') {
      // What the browser tells about the adapter (wgpu sees little of it).
      try {
        const a = await navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
        const ai = a?.info ?? {};
        model.info.adapter = { vendor: ai.vendor ?? '', architecture: ai.architecture ?? '', description: ai.description ?? '' };
        const label = [ai.vendor, ai.architecture, ai.description].filter(Boolean).join(' ');
        if (label) model.info.device = model.info.device.replace(/^WebGPU adapter/, label);
      } catch { /* keep wgpu's description */ }
    }
    opts.onProgress?.({ phase: 'ready', file: null, loaded: 0, total: 0 });
    return model;
  },

  /**
   * Loads a model in a dedicated Web Worker (browser): the same API, and generation never
   * blocks the page. `opts.workerUrl` overrides the worker script.
   */
  async loadInWorker(source, opts = {}) {
    const { loadInWorker } = await import('./worker-client.js');
    return loadInWorker(source, opts);
  },

  /** The engine version. */
  async version() {
    return (await initWasm()).version();
  },

  /** Runs the SIMD128 kernels against the scalar reference (used by the tests). */
  async kernelSelfTest() {
    return JSON.parse((await initWasm()).kernelSelfTest());
  },

  hasWebGPU,
  isNode,
};

export default BitNet;
