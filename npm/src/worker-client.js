// The page side of the worker: a model proxy with the same API as BitNetModel.
import { makeChat } from './chat.js';
import { abortError } from './runtime.js';
import { checkGenerateOptions, checkLoadOptions, checkPrompt } from './options.js';

function remoteError(e) {
  const err = new Error(e.message);
  err.name = e.name;
  return err;
}

class WorkerModel {
  #w;
  #next = 1;
  #pending = new Map();
  #name;

  constructor(worker, name) {
    this.#w = worker;
    this.#name = name;
    this.info = null;
    this.chat = makeChat(this, () => this.#name);
    worker.onmessage = (ev) => {
      const m = ev.data;
      const p = this.#pending.get(m.id);
      if (p) p(m);
    };
    worker.onerror = (ev) => {
      const err = new Error(`bitnet-inference worker failed: ${ev.message ?? 'error'}`);
      for (const p of this.#pending.values()) p({ type: 'error', error: { name: 'Error', message: err.message } });
    };
  }

  get backend() {
    return this.info?.backend;
  }

  /** Sends a request; `onMessage` sees every reply until it returns true. */
  #request(msg, onMessage, transfer) {
    const id = this.#next++;
    this.#pending.set(id, (m) => {
      if (onMessage(m)) this.#pending.delete(id);
    });
    this.#w.postMessage({ ...msg, id }, transfer ?? []);
    return id;
  }

  #call(msg, onProgress) {
    return new Promise((resolve, reject) => {
      this.#request(msg, (m) => {
        if (m.type === 'progress') {
          onProgress?.(m.data);
          return false;
        }
        if (m.type === 'error') reject(remoteError(m.error));
        else resolve(m.value);
        return true;
      });
    });
  }

  async _load(source, opts) {
    // Functions and signals cannot cross to the worker: progress comes back as messages, and
    // an abort ends the worker.
    const { onProgress, signal, workerUrl, fetch: _fetch, wasm: _wasm, ...rest } = opts;
    if (signal?.aborted) throw abortError(signal);
    let onAbort;
    const aborted = new Promise((_, reject) => {
      onAbort = () => reject(abortError(signal));
      signal?.addEventListener('abort', onAbort, { once: true });
    });
    try {
      this.info = await Promise.race([this.#call({ type: 'load', source, opts: rest }, onProgress), aborted]);
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    return this;
  }

  encode(text, opts) { return this.#call({ type: 'call', method: 'encode', args: [text, opts] }); }
  decode(ids, opts) { return this.#call({ type: 'call', method: 'decode', args: [Array.from(ids), opts] }); }
  applyChatTemplate(messages, opts) {
    return this.#call({ type: 'call', method: 'applyChatTemplate', args: [messages, opts] });
  }
  tokenize(input, opts) { return this.#call({ type: 'call', method: 'tokenize', args: [input, opts] }); }
  logits(input) { return this.#call({ type: 'call', method: 'logits', args: [input] }); }

  async *generate(input, opts = {}) {
    checkPrompt(input);
    checkGenerateOptions(opts);
    const { signal, ...rest } = opts;
    if (signal?.aborted) throw abortError(signal);
    const queue = [];
    let wake = null;
    let finished = false;
    const id = this.#request({ type: 'generate', input, opts: rest }, (m) => {
      queue.push(m);
      wake?.();
      return m.type === 'end' || m.type === 'error';
    });
    const onAbort = () => {
      this.#w.postMessage({ type: 'abort', target: id });
      queue.push({ type: 'aborted' });
      wake?.();
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      for (;;) {
        if (!queue.length) await new Promise((r) => { wake = r; });
        wake = null;
        const m = queue.shift();
        if (m.type === 'chunk') yield m.chunk;
        else if (m.type === 'end') { finished = true; return; }
        else if (m.type === 'aborted') { finished = true; throw abortError(signal); }
        else if (m.type === 'error') { finished = true; throw remoteError(m.error); }
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      if (!finished) this.#w.postMessage({ type: 'abort', target: id });
    }
  }

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

  /** Frees the model and ends the worker. */
  dispose() {
    this.#w.terminate();
    for (const p of this.#pending.values()) p({ type: 'error', error: { name: 'Error', message: 'the model was disposed' } });
    this.#pending.clear();
  }

  [Symbol.dispose]() {
    this.dispose();
  }
}

export async function loadInWorker(source, opts = {}) {
  checkLoadOptions(opts);
  if (typeof Worker === 'undefined') throw new Error('loadInWorker needs Web Workers (a browser)');
  const url = opts.workerUrl ?? new URL('./worker.js', import.meta.url);
  const worker = new Worker(url, { type: 'module', name: 'bitnet-inference' });
  // Relative URLs are resolved against the page, not the worker script.
  let src = source;
  if (typeof source === 'string' && typeof location !== 'undefined') src = new URL(source, location.href).href;
  else if (source instanceof URL) src = source.href;
  else if (source && typeof source.length === 'number') src = Array.from(source);
  const name = opts.name ?? (typeof src === 'string' ? src : 'local');
  const m = new WorkerModel(worker, name);
  try {
    return await m._load(src, opts);
  } catch (e) {
    worker.terminate();
    throw e;
  }
}
