// The demo page: load a model (default, URL or local files) in a worker, chat with streamed
// tokens, show progress, backend and speed, stop generation. Static: no server logic.
import { BitNet, listCachedModels, deleteCachedModel } from '../npm/src/index.js';

/** The repository's default model, relative to this page. One place to change it. */
export const DEFAULT_MODEL_URL = new URL('../models/kjv-fortunes/', import.meta.url).href;

/** Models the picker offers: [label with the download size, source]. */
export const PRESETS = [
  ['KJV fortunes, 38M parameters (19 MB, the default)', DEFAULT_MODEL_URL],
  ['Tiny random test model (0.3 MB)', new URL('../models/tiny/', import.meta.url).href],
  ['BitNet b1.58 2B-4T from the Hub (1.2 GB; WebGPU recommended)', 'hf://microsoft/bitnet-b1.58-2B-4T'],
];

const $ = (id) => document.getElementById(id);
const ui = {
  status: $('status'), backend: $('backend'), device: $('device'), speed: $('speed'),
  loadForm: $('load-form'), loadBtn: $('load-btn'), url: $('model-url'), files: $('model-files'),
  backendSelect: $('backend-select'), progress: $('progress'), progressText: $('progress-text'),
  messages: $('messages'), chatForm: $('chat-form'), prompt: $('prompt'), send: $('send-btn'),
  stop: $('stop-btn'), clear: $('clear-btn'), cacheList: $('cache-list'), cacheBox: $('cache-box'),
  maxTokens: $('max-tokens'), temperature: $('temperature'), topP: $('top-p'), version: $('version'),
  defaultUrl: $('default-url'), preset: $('model-preset'), cancelLoad: $('cancel-load-btn'),
};

let model = null;
let history = [];
let abort = null;
let loadAbort = null;
/** Load options from the page's address (`threads`, `storage`). */
const loadExtra = {};

const setState = (s) => { document.documentElement.dataset.state = s; };
function setStatus(text, error = false) {
  ui.status.textContent = text;
  ui.status.classList.toggle('error', error);
}
const fmtBytes = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(2)} GB` : n >= 1e6 ? `${(n / 1e6).toFixed(1)} MB` : `${(n / 1e3).toFixed(0)} kB`);

function setBusy(generating) {
  const loading = !!loadAbort;
  ui.send.disabled = !model || generating || loading;
  ui.prompt.disabled = !model;
  ui.stop.disabled = !generating;
  ui.loadBtn.disabled = generating || loading;
  ui.cancelLoad.disabled = !loading;
}

const fmtTime = (s) => (s >= 90 ? `${Math.round(s / 60)} min` : `${Math.max(1, Math.round(s))} s`);
let downloadStart = 0;

function onProgress(p) {
  if (p.phase === 'download') {
    const now = performance.now();
    if (!downloadStart) downloadStart = now;
    const secs = (now - downloadStart) / 1000;
    const rate = secs > 0.5 ? p.loaded / secs : 0;
    ui.progress.max = Math.max(p.total, 1);
    ui.progress.value = p.loaded;
    let text = `Downloading ${p.file}: ${fmtBytes(p.loaded)}`;
    if (p.total) text += ` of ${fmtBytes(p.total)} (${Math.floor((100 * p.loaded) / p.total)}%)`;
    if (rate) text += `, ${fmtBytes(rate)}/s`;
    if (rate && p.total > p.loaded) text += `, about ${fmtTime((p.total - p.loaded) / rate)} left`;
    ui.progressText.textContent = text;
  } else if (p.phase === 'load') {
    ui.progress.removeAttribute('value');
    ui.progressText.textContent = 'Preparing the weights for the backend…';
  } else if (p.phase === 'ready') {
    ui.progress.max = 1;
    ui.progress.value = 1;
  }
}

/**
 * Loads a model from a URL, `hf://owner/name`, a FileList or the default; `backend`: auto |
 * webgpu | cpu. The model in use stays until the new one is ready (a failed or cancelled load
 * keeps it).
 */
export async function load(source = DEFAULT_MODEL_URL, backend = 'auto') {
  loadAbort?.abort();
  const ac = new AbortController();
  loadAbort = ac;
  downloadStart = 0;
  setState('loading');
  setBusy(false);
  setStatus('Loading the model…');
  const t0 = performance.now();
  try {
    const next = await BitNet.loadInWorker(source, { backend, onProgress, signal: ac.signal, ...loadExtra });
    model?.dispose();
    model = next;
    const i = model.info;
    ui.backend.textContent = i.backend === 'webgpu' ? 'WebGPU'
      : `CPU (${i.kernels}, ${i.threads} thread${i.threads === 1 ? '' : 's'})`;
    ui.device.textContent = i.device;
    ui.speed.textContent = '–';
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    let msg = `Model ready (${fmtBytes(i.fileBytes)}, ${i.config.num_hidden_layers} layers, loaded in ${secs} s).`;
    if (i.fallbackReason) msg += ` Using the CPU: ${i.fallbackReason}`;
    if (i.backend === 'cpu' && i.threads === 1 && i.threadsReason && !loadExtra.threads) {
      msg += ` One CPU thread: ${i.threadsReason}.`;
    }
    if (i.cacheWarning) msg += ` Note: ${i.cacheWarning}.`;
    setStatus(msg);
    ui.progressText.textContent = '';
    history = [];
    ui.messages.replaceChildren();
    refreshCache();
    ui.prompt.focus();
  } catch (e) {
    const kept = model ? ' The previous model stays loaded.' : '';
    if (e.name === 'AbortError') setStatus(`Loading cancelled.${kept}`);
    else setStatus(`Could not load the model: ${e.message}.${kept}`, true);
    ui.progressText.textContent = '';
  } finally {
    if (loadAbort === ac) loadAbort = null;
    setState(model ? 'ready' : 'error');
    setBusy(false);
  }
  return model;
}

function addMessage(role, text = '') {
  const li = document.createElement('li');
  li.className = `msg ${role}`;
  const who = document.createElement('span');
  who.className = 'visually-hidden';
  who.textContent = role === 'user' ? 'You: ' : 'Model: ';
  const body = document.createElement('span');
  body.className = 'body';
  body.textContent = text;
  li.append(who, body);
  ui.messages.append(li);
  ui.messages.scrollTop = ui.messages.scrollHeight;
  return li;
}

function genOptions() {
  const num = (el, d) => (Number.isFinite(el.valueAsNumber) ? el.valueAsNumber : d);
  return {
    maxTokens: num(ui.maxTokens, 128), temperature: num(ui.temperature, 0), topP: num(ui.topP, 1),
    ...window.bitnetDemo?.extraOptions,
  };
}

async function send(text) {
  if (!model) return;
  if (!text.trim()) {
    setStatus('Type a message first.', true);
    ui.prompt.focus();
    return;
  }
  history.push({ role: 'user', content: text });
  addMessage('user', text);
  const li = addMessage('assistant');
  li.classList.add('streaming');
  li.setAttribute('aria-busy', 'true');
  const body = li.querySelector('.body');
  abort = new AbortController();
  setBusy(true);
  setState('generating');
  setStatus('Generating…');
  let input = text;
  if (model.info.hasChatTemplate) {
    // Keep the conversation inside the context window: drop the oldest turns if needed.
    let msgs = history;
    const room = model.info.contextLength - Math.min(64, Math.floor(model.info.contextLength / 4));
    while (msgs.length > 1 && (await model.tokenize({ messages: msgs })).length > room) msgs = msgs.slice(2);
    input = { messages: msgs };
  }
  let answer = '';
  let n = 0;
  const t0 = performance.now();
  let first = 0;
  try {
    for await (const c of model.generate(input, { ...genOptions(), signal: abort.signal })) {
      answer += c.text;
      body.textContent = answer;
      if (c.token !== null) n++;
      if (n === 1 && !first) first = performance.now();
      if (n > 1) ui.speed.textContent = `${((n - 1) / ((performance.now() - first) / 1000)).toFixed(1)} tok/s`;
      ui.messages.scrollTop = ui.messages.scrollHeight;
      if (c.done) {
        const t = c.timings;
        ui.speed.textContent = `${t.tokensPerSecond.toFixed(1)} tok/s`;
        const meta = document.createElement('span');
        meta.className = 'meta';
        meta.textContent = `${c.completionTokens} tokens · ${t.tokensPerSecond.toFixed(1)} tok/s · prompt ${c.promptTokens} tokens in ${(t.prefillSeconds * 1000).toFixed(0)} ms · ${c.finishReason}`;
        li.append(meta);
      }
    }
    setStatus('Ready.');
  } catch (e) {
    if (e.name === 'AbortError') {
      const meta = document.createElement('span');
      meta.className = 'meta';
      meta.textContent = `stopped after ${n} tokens (${((performance.now() - t0) / 1000).toFixed(1)} s)`;
      li.append(meta);
      setStatus('Stopped.');
    } else {
      li.classList.add('error');
      body.textContent = answer + (answer ? '\n' : '') + `Error: ${e.message}`;
      setStatus(`Generation failed: ${e.message}`, true);
    }
  } finally {
    history.push({ role: 'assistant', content: answer });
    li.classList.remove('streaming');
    li.removeAttribute('aria-busy');
    abort = null;
    setBusy(false);
    setState(model ? 'ready' : 'idle');
  }
}

async function refreshCache() {
  let items = [];
  try {
    items = await listCachedModels();
  } catch { /* no Cache API (e.g. not a secure context) */ }
  ui.cacheList.replaceChildren();
  if (!items.length) {
    const li = document.createElement('li');
    li.textContent = 'None yet.';
    ui.cacheList.append(li);
    return;
  }
  for (const m of items) {
    const li = document.createElement('li');
    const name = document.createElement('span');
    name.textContent = `${m.url} (${fmtBytes(m.bytes)}, ${m.storage === 'opfs' ? 'OPFS' : 'Cache API'})`;
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'secondary';
    del.textContent = 'Delete';
    del.setAttribute('aria-label', `Delete cached model ${m.url}`);
    del.onclick = async () => { await deleteCachedModel(m.url); refreshCache(); };
    li.append(name, del);
    ui.cacheList.append(li);
  }
}

ui.defaultUrl.textContent = new URL(DEFAULT_MODEL_URL).pathname;
for (const [label, src] of PRESETS) ui.preset.append(new Option(label, src));
ui.preset.addEventListener('change', () => { ui.loadForm.source.value = 'preset'; });
ui.cancelLoad.addEventListener('click', () => loadAbort?.abort());
ui.loadForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const kind = new FormData(ui.loadForm).get('source');
  let source = DEFAULT_MODEL_URL;
  if (kind === 'preset') source = ui.preset.value;
  else if (kind === 'url') {
    if (!ui.url.value) { setStatus('Enter a model URL first.', true); ui.url.focus(); return; }
    source = ui.url.value;
  } else if (kind === 'files') {
    if (!ui.files.files.length) { setStatus('Choose the model files first.', true); ui.files.focus(); return; }
    source = ui.files.files;
  }
  load(source, ui.backendSelect.value);
});
ui.url.addEventListener('input', () => { ui.loadForm.source.value = 'url'; });
ui.files.addEventListener('change', () => { ui.loadForm.source.value = 'files'; });
ui.chatForm.addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = ui.prompt.value;
  ui.prompt.value = '';
  send(text);
});
ui.prompt.addEventListener('keydown', (ev) => {
  if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    if (!ui.send.disabled) ui.chatForm.requestSubmit();
  }
});
ui.stop.addEventListener('click', () => abort?.abort());
ui.clear.addEventListener('click', () => { history = []; ui.messages.replaceChildren(); });
ui.cacheBox.addEventListener('toggle', refreshCache);
BitNet.version().then((v) => { ui.version.textContent = `Engine ${v}.`; }).catch(() => {});

// Deep links and tests: ?model=<url>&backend=<auto|webgpu|cpu>&threads=<n>&storage=<cache-api|opfs>&autoload=1
const params = new URLSearchParams(location.search);
if (params.has('threads')) loadExtra.threads = Number(params.get('threads'));
if (params.has('storage')) loadExtra.storage = params.get('storage');
if (params.has('backend')) ui.backendSelect.value = params.get('backend');
if (params.has('model')) {
  const m = params.get('model');
  ui.url.value = m.startsWith('hf://') ? m : new URL(m, location.href).href;
  ui.loadForm.source.value = 'url';
}
setState('idle');
setBusy(false);
if (!window.isSecureContext) {
  setStatus('This page is not in a secure context: WebGPU and the model cache need https:// or '
    + 'http://localhost (127.0.0.1). Models will run on the CPU and be downloaded on every load.', true);
}
if (params.get('autoload') === '1') {
  load(params.has('model') ? ui.url.value : DEFAULT_MODEL_URL, ui.backendSelect.value);
}

// A small handle for scripted checks (the browser test uses it).
window.bitnetDemo = {
  /** Options merged into every chat generation (tests set { ignoreEos: true }). */
  extraOptions: {},
  load,
  send,
  get model() { return model; },
  async generateTokens(ids, opts) { return (await model.generateText(ids, opts)).tokens; },
};
