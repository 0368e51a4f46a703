// The OpenAI-shaped chat API (`model.chat.completions.create`) over any model object that
// has `generate({ messages }, opts)` — the in-thread model and the worker proxy alike.

let counter = 0;
const newId = () => `chatcmpl-${Date.now().toString(36)}${(counter++).toString(36)}`;

/** The schema a `response_format` asks for (`json_object`: any object), if any. */
function jsonSchemaOf(format) {
  if (format == null || format.type === 'text') return undefined;
  if (format.type === 'json_object') return { type: 'object' };
  if (format.type === 'json_schema' && format.json_schema?.schema) return format.json_schema.schema;
  throw new TypeError("response_format must be {type: 'text' | 'json_object' | 'json_schema', json_schema: {schema}}");
}

/** Maps OpenAI request fields to generate() options. */
export function chatOptions(req) {
  const stop = req.stop == null ? undefined : req.stop;
  return {
    maxTokens: req.max_completion_tokens ?? req.max_tokens ?? req.maxTokens,
    temperature: req.temperature ?? 0,
    topP: req.top_p ?? req.topP,
    topK: req.top_k ?? req.topK,
    minP: req.min_p ?? req.minP,
    repetitionPenalty: req.repetition_penalty ?? req.repetitionPenalty,
    presencePenalty: req.presence_penalty ?? req.presencePenalty,
    frequencyPenalty: req.frequency_penalty ?? req.frequencyPenalty,
    logitBias: req.logit_bias ?? req.logitBias,
    jsonSchema: jsonSchemaOf(req.response_format) ?? req.jsonSchema,
    seed: req.seed,
    stop,
    signal: req.signal,
  };
}

function usage(c) {
  return {
    prompt_tokens: c.promptTokens,
    completion_tokens: c.completionTokens,
    total_tokens: c.promptTokens + c.completionTokens,
  };
}

function finish(reason) {
  return reason === 'cancelled' ? 'stop' : reason;
}

async function* stream(model, name, req, opts) {
  const id = newId();
  const created = Math.floor(Date.now() / 1000);
  const base = { id, object: 'chat.completion.chunk', created, model: name };
  yield { ...base, choices: [{ index: 0, delta: { role: 'assistant', content: '' }, finish_reason: null }] };
  for await (const c of model.generate({ messages: req.messages }, opts)) {
    if (c.text) yield { ...base, choices: [{ index: 0, delta: { content: c.text }, finish_reason: null }] };
    if (c.done) {
      const last = { ...base, choices: [{ index: 0, delta: {}, finish_reason: finish(c.finishReason) }] };
      if (req.stream_options?.include_usage) last.usage = usage(c);
      last.timings = c.timings;
      yield last;
    }
  }
}

/** `{ completions: { create } }` for `model`, reported under the model name `name()`. */
export function makeChat(model, name) {
  return {
    completions: {
      create(req = {}) {
        if (!Array.isArray(req.messages)) {
          return Promise.reject(new TypeError('chat.completions.create: `messages` must be an array'));
        }
        const opts = chatOptions(req);
        if (req.stream) return Promise.resolve(stream(model, name(), req, opts));
        return (async () => {
          let text = '';
          let last = null;
          for await (const c of model.generate({ messages: req.messages }, opts)) {
            text += c.text;
            if (c.done) last = c;
          }
          return {
            id: newId(),
            object: 'chat.completion',
            created: Math.floor(Date.now() / 1000),
            model: name(),
            choices: [{
              index: 0,
              message: { role: 'assistant', content: text },
              finish_reason: finish(last?.finishReason ?? 'stop'),
            }],
            usage: last ? usage(last) : undefined,
            timings: last?.timings,
          };
        })();
      },
    },
  };
}
