// Where downloaded model files are kept between loads: the Cache API (default) or the origin
// private file system (OPFS, `storage: 'opfs'`). Both hold, per model directory URL, its files
// and a manifest of their sizes and SHA-256 recorded at download; nothing cached is used before
// it matches the manifest, and what does not match is deleted (so it is downloaded again).

export const CACHE_NAME = 'bitnet-inference-models-v1';
const OPFS_DIR = 'bitnet-inference-models-v1';
const MANIFEST = '__bitnet_cache_manifest__.json';

const hasCacheApi = () => typeof caches !== 'undefined' && typeof caches.open === 'function';
const hasOpfs = () => typeof navigator !== 'undefined' && typeof navigator.storage?.getDirectory === 'function';

/** The SHA-256 of `bytes` as hex (Web Crypto, in browsers and Node alike). */
export async function sha256(bytes) {
  const d = new Uint8Array(await globalThis.crypto.subtle.digest('SHA-256', bytes));
  return Array.from(d, (x) => x.toString(16).padStart(2, '0')).join('');
}

const notFound = (e) => e?.name === 'NotFoundError' || e?.name === 'TypeMismatchError';

/** The Cache API: one entry per file URL, the manifest next to the files. */
const cacheApi = {
  kind: 'cache-api',
  available: hasCacheApi,
  open: () => caches.open(CACHE_NAME),
  async get(base, name) {
    const r = await (await this.open()).match(new URL(name, base).href);
    return r ? new Uint8Array(await r.arrayBuffer()) : null;
  },
  async put(base, name, bytes) {
    await (await this.open()).put(new URL(name, base).href,
      new Response(bytes, { headers: { 'content-type': 'application/octet-stream' } }));
  },
  async names(base) {
    const out = [];
    for (const req of await (await this.open()).keys()) {
      const rest = req.url.startsWith(base.href) ? req.url.slice(base.href.length) : '';
      if (rest && !rest.includes('/')) out.push(rest);
    }
    return out;
  },
  async remove(base, name) {
    return (await this.open()).delete(new URL(name, base).href);
  },
  async bases() {
    const keys = await (await this.open()).keys();
    return keys.filter((r) => r.url.endsWith('/' + MANIFEST)).map((r) => new URL('./', r.url));
  },
  clear: () => caches.delete(CACHE_NAME),
};

/** OPFS: a directory per model (named by the SHA-256 of its URL), holding its files. */
const opfs = {
  kind: 'opfs',
  available: hasOpfs,
  async root(create = true) {
    const top = await navigator.storage.getDirectory();
    return top.getDirectoryHandle(OPFS_DIR, { create });
  },
  async dir(base, create) {
    const name = (await sha256(new TextEncoder().encode(base.href))).slice(0, 40);
    try {
      return await (await this.root()).getDirectoryHandle(name, { create });
    } catch (e) {
      if (notFound(e)) return null;
      throw e;
    }
  },
  async get(base, name) {
    const d = await this.dir(base, false);
    if (!d) return null;
    try {
      const f = await (await d.getFileHandle(name)).getFile();
      return new Uint8Array(await f.arrayBuffer());
    } catch (e) {
      if (notFound(e)) return null;
      throw e;
    }
  },
  async put(base, name, bytes) {
    const fh = await (await this.dir(base, true)).getFileHandle(name, { create: true });
    if (typeof fh.createWritable !== 'function') throw new Error('this browser cannot write OPFS files here (no createWritable)');
    const w = await fh.createWritable();
    try {
      await w.write(bytes);
      await w.close();
    } catch (e) {
      await w.abort?.().catch(() => {});
      throw e;
    }
  },
  async names(base) {
    const d = await this.dir(base, false);
    const out = [];
    if (d) for await (const [name, h] of d.entries()) if (h.kind === 'file') out.push(name);
    return out;
  },
  async remove(base, name) {
    const d = await this.dir(base, false);
    if (!d) return false;
    try {
      await d.removeEntry(name);
      return true;
    } catch (e) {
      if (notFound(e)) return false;
      throw e;
    }
  },
  async bases() {
    const out = [];
    for await (const [, h] of (await this.root()).entries()) {
      if (h.kind !== 'directory') continue;
      try {
        const m = JSON.parse(await (await (await h.getFileHandle(MANIFEST)).getFile()).text());
        out.push(new URL(m.url));
      } catch { /* no or damaged manifest: not listed */ }
    }
    return out;
  },
  async clear() {
    try {
      await (await navigator.storage.getDirectory()).removeEntry(OPFS_DIR, { recursive: true });
      return true;
    } catch (e) {
      if (notFound(e)) return false;
      throw e;
    }
  },
};

const STORES = [cacheApi, opfs];

/** The store for `storage` ('cache-api' or 'opfs') where it exists here, else null. */
export function storeFor(storage = 'cache-api') {
  const s = STORES.find((x) => x.kind === storage);
  return s?.available() ? s : null;
}

async function manifestOf(store, base) {
  try {
    const b = await store.get(base, MANIFEST);
    return b ? JSON.parse(new TextDecoder().decode(b)) : null;
  } catch {
    return null;
  }
}

/**
 * The stored files of the model at `base` that still match their manifest: name → bytes.
 * Files that do not match are deleted (and will be downloaded again); without a manifest
 * nothing stored is trusted.
 */
export async function verifiedFiles(store, base, onFile) {
  const listed = new Map(((await manifestOf(store, base))?.files ?? []).map((f) => [f.name, f]));
  const good = new Map();
  for (const name of await store.names(base)) {
    if (name === MANIFEST) continue;
    const want = listed.get(name);
    const bytes = await store.get(base, name);
    if (want && bytes && bytes.byteLength === want.bytes && (await sha256(bytes)) === want.sha256) {
      onFile?.(name, bytes.byteLength);
      good.set(name, bytes);
    } else {
      console.warn(`bitnet-inference: the stored ${new URL(name, base).href} (${store.kind}) is damaged or unverified; downloading it again`);
      await store.remove(base, name);
    }
  }
  return good;
}

/**
 * Stores a model's files and their manifest. Resolves to null or a message saying why storing
 * failed (e.g. the storage quota); a partly stored model is removed.
 */
export async function storeFiles(store, base, files) {
  const entries = [];
  try {
    for (const [name, bytes] of files) {
      entries.push({ name, bytes: bytes.byteLength, sha256: await sha256(bytes) });
      await store.put(base, name, bytes);
    }
    const manifest = {
      url: base.href,
      storage: store.kind,
      files: entries,
      bytes: entries.reduce((a, f) => a + f.bytes, 0),
      cachedAt: new Date().toISOString(),
    };
    await store.put(base, MANIFEST, new TextEncoder().encode(JSON.stringify(manifest)));
    return null;
  } catch (e) {
    await removeModel(store, base).catch(() => {});
    const quota = e?.name === 'QuotaExceededError';
    const why = quota ? 'the browser storage quota is exhausted' : (e?.message ?? String(e));
    return `the model was not cached (${store.kind}): ${why}`;
  }
}

async function removeModel(store, base) {
  let any = false;
  for (const name of await store.names(base)) any = (await store.remove(base, name)) || any;
  return any;
}

/** Whether the model at `base` is stored (in either store) with every file its manifest lists. */
export async function hasStored(base) {
  for (const store of STORES.filter((s) => s.available())) {
    const m = await manifestOf(store, base);
    if (!m?.files?.length) continue;
    const names = new Set(await store.names(base));
    if (m.files.every((f) => names.has(f.name))) return true;
  }
  return false;
}

/** The manifests of every stored model: `[{url, storage, files, bytes, cachedAt}]`. */
export async function listStored() {
  const out = [];
  for (const store of STORES.filter((s) => s.available())) {
    for (const base of await store.bases()) {
      const m = await manifestOf(store, base);
      if (m) out.push({ ...m, storage: store.kind });
    }
  }
  return out.sort((a, b) => a.url.localeCompare(b.url) || a.storage.localeCompare(b.storage));
}

/** Deletes the model at `base` from both stores; resolves to whether anything was deleted. */
export async function removeStored(base) {
  let any = false;
  for (const store of STORES.filter((s) => s.available())) any = (await removeModel(store, base)) || any;
  return any;
}

/** Deletes every stored model from both stores. */
export async function clearStored() {
  let any = false;
  for (const store of STORES.filter((s) => s.available())) any = (await store.clear()) || any;
  return any;
}
