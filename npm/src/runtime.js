// Loading the WebAssembly modules once per realm (page, worker or Node process), and turning
// the modules' failures into ordinary Errors. Two modules: the main one (WebGPU and the
// single-threaded CPU path) and, where it was built (`npm run build -- --threads`), the threaded
// CPU module (wasm atomics, a pool of Web Workers), used in cross-origin-isolated Web Workers.
import init, * as wasm from '../pkg/bitnet_inference.js';

export const isNode =
  typeof process !== 'undefined' && !!process.versions?.node && typeof window === 'undefined' &&
  typeof WorkerGlobalScope === 'undefined';

let ready = null;
let threaded = null;
/** The initialised modules (their panic hooks are asked for a message by toError). */
const modules = [wasm];

/** Instantiates the main module (idempotent). `source` overrides where the .wasm comes from. */
export function initWasm(source) {
  if (!ready) {
    ready = (async () => {
      let module_or_path = source ?? new URL('../pkg/bitnet_inference_bg.wasm', import.meta.url);
      if (isNode && !source) {
        const fs = await import(/* webpackIgnore: true */ 'node:fs/promises');
        module_or_path = await fs.readFile(module_or_path);
      }
      await init({ module_or_path });
      return wasm;
    })();
    ready.catch(() => { ready = null; });
  }
  return ready;
}

/**
 * Why the threaded CPU module cannot run here, or null when it can: it needs a Web Worker
 * (the pool's workers block, which a page's main thread may not) of a cross-origin-isolated
 * page (SharedArrayBuffer).
 */
export function threadsUnavailableReason() {
  if (isNode) return 'Node runs the single-threaded module';
  if (typeof WorkerGlobalScope === 'undefined') return 'threads need the model in a Web Worker (BitNet.loadInWorker)';
  if (globalThis.crossOriginIsolated !== true || typeof SharedArrayBuffer === 'undefined') {
    return 'the page is not cross-origin isolated (serve it with Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp)';
  }
  return null;
}

/**
 * Instantiates the threaded module with a pool of `n` Web Workers. The pool is made once per
 * realm: later calls get the first pool (the engine refuses more threads than it has).
 */
export function initWasmThreads(n) {
  if (!threaded) {
    threaded = (async () => {
      let m;
      try {
        m = await import('../pkg/threads/bitnet_inference.js');
      } catch (e) {
        throw new Error(`bitnet-inference: the threaded module is missing (build it with \`npm run build -- --threads\`): ${e?.message ?? e}`);
      }
      await m.default();
      await m.initThreadPool(n);
      modules.push(m);
      return m;
    })();
    threaded.catch(() => { threaded = null; });
  }
  return threaded;
}

/** An Error from anything the module threw; a trap after a Rust panic carries its message. */
export function toError(e) {
  let panic = null;
  for (const m of modules) {
    try { panic ??= m.takePanicMessage?.() ?? null; } catch { /* module not initialised */ }
  }
  if (panic) {
    const err = new Error(panic);
    err.cause = e;
    return err;
  }
  if (typeof WebAssembly !== 'undefined' && e instanceof WebAssembly.RuntimeError) {
    // A trap without a panic message: an allocation failure aborts this way.
    const err = new Error(`bitnet-inference: the WebAssembly engine stopped (${e.message}); ` +
      'most likely it ran out of memory (wasm32 is limited to 4 GiB): try WebGPU, a shorter ' +
      'contextLength or a smaller model. Load the model again before further use.');
    err.cause = e;
    return err;
  }
  if (e instanceof Error) return e;
  return new Error(typeof e === 'string' ? e : String(e));
}

/** Runs `f`, converting what it throws or rejects with through {@link toError}. */
export async function guard(f) {
  try {
    return await f();
  } catch (e) {
    throw toError(e);
  }
}

/** Lets the event loop run (timers, messages, abort events) between tokens. */
export function yieldToEventLoop() {
  if (isNode && typeof setImmediate === 'function') return new Promise((r) => setImmediate(r));
  if (typeof MessageChannel !== 'undefined') {
    return new Promise((r) => {
      const ch = new MessageChannel();
      ch.port1.onmessage = () => { ch.port1.close(); r(); };
      ch.port2.postMessage(0);
    });
  }
  return new Promise((r) => setTimeout(r, 0));
}

export function abortError(signal) {
  const reason = signal?.reason;
  if (reason instanceof Error) return reason;
  if (typeof DOMException !== 'undefined') return new DOMException('The generation was aborted', 'AbortError');
  const e = new Error('The generation was aborted');
  e.name = 'AbortError';
  return e;
}
