// Strict checks of the options objects: unknown names and invalid values are errors that
// name the option, never silently ignored.

const isInt = (v) => Number.isSafeInteger(v);
const isNum = (v) => typeof v === 'number' && Number.isFinite(v);

/** [name, check(value) → true when valid, what a valid value is]. */
const LOAD = [
  ['backend', (v) => ['auto', 'webgpu', 'cpu'].includes(v), "'auto', 'webgpu' or 'cpu'"],
  ['onProgress', (v) => typeof v === 'function', 'a function'],
  ['cache', (v) => typeof v === 'boolean', 'a boolean'],
  ['storage', (v) => ['cache-api', 'opfs'].includes(v), "'cache-api' or 'opfs'"],
  ['contextLength', (v) => isInt(v) && v >= 1, 'a positive integer'],
  ['subgroups', (v) => typeof v === 'boolean', 'a boolean'],
  ['threads', (v) => v === 'auto' || (isInt(v) && v >= 1 && v <= 64), "'auto' or an integer from 1 to 64"],
  ['kernels', (v) => ['auto', 'simd128', 'scalar'].includes(v), "'auto', 'simd128' or 'scalar'"],
  ['maxBindingBytes', (v) => isInt(v) && v >= 256, 'an integer of at least 256'],
  ['signal', (v) => typeof v === 'object' && 'aborted' in v, 'an AbortSignal'],
  ['fetch', (v) => typeof v === 'function', 'a function'],
  ['name', (v) => typeof v === 'string', 'a string'],
  ['wasm', (v) => v !== null && ['string', 'object'].includes(typeof v), 'a URL, bytes or a WebAssembly.Module'],
  ['workerUrl', (v) => typeof v === 'string' || v instanceof URL, 'a URL'],
  ['hfEndpoint', (v) => typeof v === 'string' && /^https?:\/\//.test(v), 'an http(s) URL'],
  ['hfToken', (v) => typeof v === 'string' && v.length > 0, 'a non-empty string'],
];

const GENERATE = [
  ['maxTokens', (v) => isInt(v) && v >= 1, 'a positive integer'],
  ['temperature', (v) => isNum(v) && v >= 0, 'a number ≥ 0'],
  ['topK', (v) => isInt(v) && v >= 0, 'a non-negative integer (0: off)'],
  ['topP', (v) => isNum(v) && v > 0 && v <= 1, 'a number in (0, 1]'],
  ['minP', (v) => isNum(v) && v >= 0 && v <= 1, 'a number in [0, 1]'],
  ['repetitionPenalty', (v) => isNum(v) && v > 0, 'a number > 0'],
  ['presencePenalty', (v) => isNum(v) && v >= -2 && v <= 2, 'a number in [-2, 2]'],
  ['frequencyPenalty', (v) => isNum(v) && v >= -2 && v <= 2, 'a number in [-2, 2]'],
  ['logitBias', (v) => v !== null && typeof v === 'object' && !Array.isArray(v)
    && Object.entries(v).every(([k, b]) => /^[0-9]+$/.test(k) && isNum(b) && b >= -100 && b <= 100),
    'an object of token id → bias in [-100, 100]'],
  ['seed', (v) => isInt(v) && v >= 0, 'a non-negative integer'],
  ['jsonSchema', (v) => v !== null && typeof v === 'object' && !Array.isArray(v), 'a JSON schema object'],
  ['grammar', (v) => typeof v === 'string' && v.length > 0, 'a Lark grammar (non-empty string)'],
  ['regex', (v) => typeof v === 'string' && v.length > 0, 'a regular expression (non-empty string)'],
  ['stop', (v) => typeof v === 'string' || (Array.isArray(v) && v.every((s) => typeof s === 'string' && s.length > 0)),
    'a string or an array of non-empty strings'],
  ['ignoreEos', (v) => typeof v === 'boolean', 'a boolean'],
  ['eosTokenIds', (v) => Array.isArray(v) && v.every((t) => isInt(t) && t >= 0), 'an array of token ids'],
  ['window', (v) => isInt(v) && v >= 2, 'an integer ≥ 2 (positions)'],
  ['sinks', (v) => isInt(v) && v >= 0, 'a non-negative integer (positions)'],
  ['signal', (v) => typeof v === 'object' && 'aborted' in v, 'an AbortSignal'],
  ['addSpecialTokens', (v) => typeof v === 'boolean', 'a boolean'],
  ['yieldEvery', (v) => isInt(v) && v >= 1, 'a positive integer'],
];

function check(kind, rules, opts) {
  if (opts == null) return {};
  if (typeof opts !== 'object' || Array.isArray(opts)) throw new TypeError(`${kind} options must be an object`);
  const known = new Map(rules.map((r) => [r[0], r]));
  for (const [k, v] of Object.entries(opts)) {
    const rule = known.get(k);
    if (!rule) {
      throw new TypeError(`unknown ${kind} option \`${k}\` (known: ${rules.map((r) => r[0]).join(', ')})`);
    }
    if (v === undefined) continue;
    if (!rule[1](v)) throw new RangeError(`${kind} option \`${k}\` must be ${rule[2]} (got ${JSON.stringify(v) ?? String(v)})`);
  }
  return opts;
}

/** Checks `BitNet.load` options; returns them. */
export const checkLoadOptions = (opts) => check('load', LOAD, opts);

/** Checks `generate` options; returns them. */
export const checkGenerateOptions = (opts) => check('generate', GENERATE, opts);

/** Checks a prompt: a non-empty string, token ids, or `{ messages }` with at least one message. */
export function checkPrompt(input) {
  if (typeof input === 'string') return input;
  if (Array.isArray(input) || ArrayBuffer.isView(input)) {
    if (input.length === 0) throw new RangeError('the prompt is empty (no tokens)');
    return input;
  }
  if (input && typeof input === 'object' && 'messages' in input) {
    const m = input.messages;
    if (!Array.isArray(m)) throw new TypeError('`messages` must be an array of { role, content }');
    if (m.length === 0) throw new RangeError('`messages` is empty: give at least one message');
    return input;
  }
  throw new TypeError('prompt must be a string, token ids, or { messages }');
}
