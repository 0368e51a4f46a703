// Gathering a checkpoint's files from a URL, a local path (Node), File objects or bytes, with
// download progress and a browser cache (store.js: Cache API or OPFS) that can be listed and
// cleared.
import { isNode } from './runtime.js';
import { storeFor, verifiedFiles, storeFiles, hasStored, listStored, removeStored, clearStored } from './store.js';

export { CACHE_NAME } from './store.js';
const OPTIONAL = ['tokenizer.json', 'tokenizer_config.json', 'generation_config.json', 'chat_template.jinja'];
const KNOWN = new Set(['config.json', ...OPTIONAL, 'model.safetensors.index.json']);

/** Where `hf://` references resolve unless `hfEndpoint` says otherwise. */
export const HF_ENDPOINT = 'https://huggingface.co';

const HUB_REF = /^hf:\/\/([A-Za-z0-9][\w.-]*)\/([A-Za-z0-9][\w.-]*)(?:@([^/]+))?(\/.*)?$/;

/**
 * The directory URL of a Hub reference `hf://owner/name[@revision][/sub/dir]` (revision
 * default `main`): `{endpoint}/owner/name/resolve/{revision}/{sub/dir}/`.
 */
export function hubUrl(ref, endpoint = HF_ENDPOINT) {
  const m = HUB_REF.exec(ref);
  if (!m || m[2].includes('..') || (m[4] ?? '').split('/').includes('..')) {
    throw new Error(`${ref}: not a Hub reference (hf://owner/name[@revision][/path])`);
  }
  const [, owner, name, revision = 'main', sub = '/'] = m;
  const dir = sub.endsWith('/') ? sub : `${sub}/`;
  return new URL(`${String(endpoint).replace(/\/+$/, '')}/${owner}/${name}/resolve/${encodeURIComponent(revision)}${dir}`);
}

function toBytes(v) {
  if (v instanceof Uint8Array) return v;
  if (v instanceof ArrayBuffer) return new Uint8Array(v);
  if (ArrayBuffer.isView(v)) return new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  throw new TypeError('expected a Uint8Array, ArrayBuffer, Blob or File');
}

function isBlob(v) {
  return typeof Blob !== 'undefined' && v instanceof Blob;
}

/** Reads a response body (or blob stream) into one Uint8Array, reporting progress. */
async function readStream(stream, total, onBytes, signal) {
  const reader = stream.getReader();
  const chunks = [];
  let loaded = 0;
  for (;;) {
    if (signal?.aborted) {
      await reader.cancel().catch(() => {});
      throw signal.reason ?? new Error('aborted');
    }
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    loaded += value.byteLength;
    onBytes(loaded, total);
  }
  if (chunks.length === 1) return chunks[0];
  const out = new Uint8Array(loaded);
  let o = 0;
  for (const c of chunks) {
    out.set(c, o);
    o += c.byteLength;
  }
  return out;
}

async function blobBytes(blob, onBytes, signal) {
  if (blob.stream) return readStream(blob.stream(), blob.size, onBytes, signal);
  const b = new Uint8Array(await blob.arrayBuffer());
  onBytes(b.byteLength, b.byteLength);
  return b;
}

/** Progress over several files: per-file bytes summed into one running total. */
class Progress {
  constructor(cb) {
    this.cb = cb;
    this.files = new Map();
  }
  update(file, loaded, total) {
    this.files.set(file, { loaded, total: total || 0 });
    if (!this.cb) return;
    let l = 0;
    let t = 0;
    for (const f of this.files.values()) {
      l += f.loaded;
      t += Math.max(f.total, f.loaded);
    }
    this.cb({ phase: 'download', file, fileLoaded: loaded, fileTotal: total || 0, loaded: l, total: t });
  }
}

/** `Authorization` for downloads from the Hub endpoint when `hfToken` is set (never elsewhere). */
function authHeaders(url, opts) {
  if (!opts.hfToken) return undefined;
  const hub = new URL(opts.hfEndpoint ?? HF_ENDPOINT);
  return url.origin === hub.origin ? { authorization: `Bearer ${opts.hfToken}` } : undefined;
}

function fetcher(opts) {
  return opts.fetch ?? globalThis.fetch?.bind(globalThis);
}

/** Downloads one file (never from the cache); a body shorter than its Content-Length fails. */
async function download(url, { optional, progress, name, opts }) {
  const href = url.href;
  const f = fetcher(opts);
  if (!f) throw new Error('no fetch() in this environment');
  let res;
  try {
    res = await f(href, { signal: opts.signal, headers: authHeaders(url, opts) });
  } catch (e) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? e;
    throw new Error(`${href}: download failed (${e?.message ?? e})`);
  }
  if (res.status === 404 && optional) return null;
  if (!res.ok) throw new Error(`${href}: HTTP ${res.status} ${res.statusText}`.trim());
  const total = Number(res.headers.get('content-length')) || 0;
  const onBytes = (l, t) => progress.update(name, l, t);
  let bytes;
  try {
    bytes = res.body ? await readStream(res.body, total, onBytes, opts.signal) : new Uint8Array(await res.arrayBuffer());
  } catch (e) {
    if (opts.signal?.aborted) throw opts.signal.reason ?? e;
    throw new Error(`${href}: download failed after ${progress.files.get(name)?.loaded ?? 0} bytes (${e?.message ?? e})`);
  }
  // Content-Length counts the encoded body; only an unencoded one can be compared.
  const encoded = (res.headers.get('content-encoding') ?? 'identity') !== 'identity';
  if (total && !encoded && bytes.byteLength !== total) {
    throw new Error(`${href}: download truncated (${bytes.byteLength} of ${total} bytes)`);
  }
  progress.update(name, bytes.byteLength, bytes.byteLength);
  return bytes;
}

function baseUrl(source) {
  let href = source instanceof URL ? source.href : String(source);
  const base = typeof location !== 'undefined' ? location.href : undefined;
  let u = new URL(href, base);
  if (u.pathname.endsWith('.safetensors') || u.pathname.endsWith('.json')) u = new URL('./', u);
  else if (!u.pathname.endsWith('/')) u = new URL(u.pathname + '/' + u.search, u);
  return u;
}

/** Downloads run at most this many at a time (shards in parallel). */
const PARALLEL_DOWNLOADS = 4;

async function inParallel(items, n, f) {
  const out = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      out[i] = await f(items[i]);
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, items.length) }, worker));
  return out;
}

async function filesFromUrl(source, opts, progress) {
  const base = baseUrl(source);
  const storage = opts.storage ?? 'cache-api';
  const store = opts.cache !== false && /^https?:$/.test(base.protocol) ? storeFor(storage) : null;
  // Asked for by name and missing: say so (a default cache that is missing stays quiet).
  let warning = store || !opts.storage || opts.cache === false ? null
    : `the model is not cached: no ${storage === 'opfs' ? 'OPFS' : 'Cache API'} here (browsers offer it in secure contexts)`;
  const cached = store ? await verifiedFiles(store, base, (n, b) => progress.update(n, b, b)) : new Map();
  const fetched = [];
  const get = async (name, optional) => {
    if (cached.has(name)) return [name, cached.get(name)];
    const b = await download(new URL(name, base), { optional, progress, name, opts });
    if (!b) return null;
    fetched.push([name, b]);
    return [name, b];
  };
  const files = [await get('config.json', false)];
  const small = await Promise.all(OPTIONAL.map((n) => get(n, true)));
  files.push(...small.filter(Boolean));
  const weights = await get('model.safetensors', true);
  if (weights) {
    files.push(weights);
  } else {
    const index = await get('model.safetensors.index.json', true);
    if (!index) throw new Error(`${base.href}: no model.safetensors or model.safetensors.index.json`);
    files.push(...(await inParallel(shardNames(index[1]), PARALLEL_DOWNLOADS, (s) => get(s, false))));
  }
  // The caller stores the downloads (checked against their Content-Length) before building
  // the model, and evicts them if the engine rejects the files.
  files.commit = async () => {
    if (store && fetched.length) warning = await storeFiles(store, base, files);
    return warning;
  };
  files.evict = async () => {
    if (store) await removeStored(base);
  };
  return files;
}

/** Whether the model at `url` is stored (Cache API or OPFS) with every file its manifest lists. */
export async function hasModelInCache(url) {
  return hasStored(baseUrl(url));
}

function shardNames(indexBytes) {
  let idx;
  try {
    idx = JSON.parse(new TextDecoder().decode(indexBytes));
  } catch (e) {
    throw new Error(`model.safetensors.index.json: ${e.message}`);
  }
  const map = idx?.weight_map;
  if (!map || typeof map !== 'object') throw new Error('model.safetensors.index.json: missing object `weight_map`');
  const names = [...new Set(Object.values(map))];
  for (const n of names) {
    if (typeof n !== 'string' || !n.endsWith('.safetensors') || n.includes('/') || n.includes('..')) {
      throw new Error(`model.safetensors.index.json: \`${n}\` is not a shard file name`);
    }
  }
  return names.sort();
}

async function filesFromPath(path, opts, progress) {
  const fs = await import(/* webpackIgnore: true */ 'node:fs/promises');
  const p = await import(/* webpackIgnore: true */ 'node:path');
  const url = await import(/* webpackIgnore: true */ 'node:url');
  let dir = path instanceof URL ? url.fileURLToPath(path) : String(path);
  if (dir.startsWith('file:')) dir = url.fileURLToPath(dir);
  if (dir.endsWith('.safetensors')) dir = p.dirname(dir);
  const read = async (name, optional) => {
    try {
      const b = new Uint8Array(await fs.readFile(p.join(dir, name)));
      progress.update(name, b.byteLength, b.byteLength);
      return [name, b];
    } catch (e) {
      if (optional && e.code === 'ENOENT') return null;
      throw new Error(`${p.join(dir, name)}: ${e.message}`);
    }
  };
  const files = [await read('config.json', false)];
  for (const n of OPTIONAL) {
    const f = await read(n, true);
    if (f) files.push(f);
  }
  const w = await read('model.safetensors', true);
  if (w) files.push(w);
  else {
    const index = await read('model.safetensors.index.json', true);
    if (!index) throw new Error(`${dir}: no model.safetensors or model.safetensors.index.json`);
    for (const s of shardNames(index[1])) files.push(await read(s, false));
  }
  return files;
}

async function filesFromEntries(entries, opts, progress) {
  const out = [];
  const names = new Set();
  for (const [rawName, v] of entries) {
    const name = String(rawName).split('/').pop();
    if (!(KNOWN.has(name) || name.endsWith('.safetensors'))) continue;
    if (name === 'model.safetensors.index.json') continue; // shards are given as files
    names.add(name);
    if (isBlob(v)) out.push([name, await blobBytes(v, (l, t) => progress.update(name, l, t), opts.signal)]);
    else if (typeof v === 'string' || v instanceof URL) {
      out.push([name, await download(new URL(v, typeof location !== 'undefined' ? location.href : undefined), {
        optional: false, progress, name, opts,
      })]);
    } else {
      const b = toBytes(v);
      progress.update(name, b.byteLength, b.byteLength);
      out.push([name, b]);
    }
  }
  if (!names.has('config.json')) throw new Error('the model files have no config.json');
  if (![...names].some((n) => n.endsWith('.safetensors'))) throw new Error('the model files have no *.safetensors');
  return out;
}

/**
 * The files of a checkpoint as [name, Uint8Array] pairs. `source`: a directory URL (or the URL
 * of its model.safetensors), a Hub reference `hf://owner/name[@revision]`, a local path or file: URL (Node), a FileList / File[] (the files
 * of a model directory), or an object mapping file names to bytes, Blobs or URLs.
 */
export async function gatherFiles(source, opts = {}) {
  const progress = new Progress(opts.onProgress);
  if (source == null) throw new TypeError('BitNet.load: no model source given');
  if (typeof source === 'object' && !(source instanceof URL)) {
    if (typeof source.length === 'number' || Symbol.iterator in source) {
      return filesFromEntries([...source].map((f) => [f.webkitRelativePath || f.name, f]), opts, progress);
    }
    const obj = source.files ?? source;
    if (typeof obj.length === 'number' || Symbol.iterator in obj) return gatherFiles(obj, opts);
    return filesFromEntries(Object.entries(obj), opts, progress);
  }
  const s = source instanceof URL ? source.href : String(source);
  if (s.startsWith('hf://')) return filesFromUrl(hubUrl(s, opts.hfEndpoint), opts, progress);
  if (isNode && !/^(https?|blob|data):/.test(s)) return filesFromPath(source, opts, progress);
  return filesFromUrl(source, opts, progress);
}

/** Models saved by earlier loads (Cache API and OPFS): `[{url, storage, files, bytes, cachedAt}]`. */
export async function listCachedModels() {
  return listStored();
}

/** Deletes every stored file of the model at `url`; resolves to whether anything was deleted. */
export async function deleteCachedModel(url) {
  return removeStored(baseUrl(url));
}

/** Deletes every stored model (Cache API and OPFS). */
export async function clearModelCache() {
  return clearStored();
}
