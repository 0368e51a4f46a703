// Loading the WebAssembly module once per realm (page, worker or Node process), and turning
// the module's failures into ordinary Errors.
import init, * as wasm from '../pkg/bitnet_inference.js';

export const isNode =
  typeof process !== 'undefined' && !!process.versions?.node && typeof window === 'undefined' &&
  typeof WorkerGlobalScope === 'undefined';

let ready = null;

/** Instantiates the module (idempotent). `source` overrides where the .wasm comes from. */
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

/** An Error from anything the module threw; a trap after a Rust panic carries its message. */
export function toError(e) {
  let panic = null;
  try { panic = wasm.takePanicMessage?.() ?? null; } catch { /* module not initialised */ }
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
