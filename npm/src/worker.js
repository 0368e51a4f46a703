// The Web Worker entry: hosts one model and serves the messages of worker-client.js, so the
// page's thread never runs the engine. Usable directly as
// `new Worker(new URL('bitnet-inference/worker', import.meta.url), { type: 'module' })`.
import { BitNet } from './index.js';

let model = null;
const aborts = new Map();

const post = (m) => self.postMessage(m);
const errorOf = (e) => ({ name: e?.name ?? 'Error', message: e?.message ?? String(e) });

async function handle(msg) {
  const { type, id } = msg;
  switch (type) {
    case 'load': {
      if (model) model.dispose();
      model = null;
      model = await BitNet.load(msg.source, {
        ...msg.opts,
        onProgress: (p) => post({ type: 'progress', id, data: p }),
      });
      post({ type: 'result', id, value: model.info });
      return;
    }
    case 'generate': {
      if (!model) throw new Error('no model loaded');
      const ac = new AbortController();
      aborts.set(id, ac);
      try {
        for await (const chunk of model.generate(msg.input, { ...msg.opts, signal: ac.signal })) {
          post({ type: 'chunk', id, chunk });
        }
        post({ type: 'end', id });
      } finally {
        aborts.delete(id);
      }
      return;
    }
    case 'abort':
      aborts.get(msg.target)?.abort();
      return;
    case 'call': {
      if (!model) throw new Error('no model loaded');
      const fns = {
        encode: (a) => model.encode(...a),
        decode: (a) => model.decode(...a),
        applyChatTemplate: (a) => model.applyChatTemplate(...a),
        tokenize: (a) => model.tokenize(...a),
        logits: (a) => model.logits(...a),
      };
      const f = fns[msg.method];
      if (!f) throw new Error(`unknown method ${msg.method}`);
      post({ type: 'result', id, value: await f(msg.args ?? []) });
      return;
    }
    case 'dispose':
      model?.dispose();
      model = null;
      post({ type: 'result', id, value: true });
      return;
    default:
      throw new Error(`unknown message type ${type}`);
  }
}

self.onmessage = (ev) => {
  const msg = ev.data;
  handle(msg).catch((e) => post({ type: 'error', id: msg.id, error: errorOf(e) }));
};
