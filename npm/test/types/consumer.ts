// Compiled by test/types.test.mjs with `strict` and without `skipLibCheck`, against the
// default libraries: the package's declarations must type-check as a consumer sees them.
import BitNet, { hubUrl, hasModelInCache, listCachedModels, type GenerateOptions, type ModelInfo } from '../../src/index.js';

export async function use(): Promise<string> {
  const m = await BitNet.load('hf://owner/name@main', { backend: 'auto', contextLength: 256, hfToken: 't' });
  const info: ModelInfo = m.info;
  const opts: GenerateOptions = { maxTokens: 8, temperature: 0 };
  let text = '';
  for await (const c of m.generate({ messages: [{ role: 'user', content: 'hi' }] }, opts)) text += c.text;
  const r = await m.chat.completions.create({ messages: [{ role: 'user', content: 'hi' }] });
  const cached = (await listCachedModels()).map((c) => c.files.map((f) => f.sha256));
  m.dispose();
  return `${info.backend} ${text} ${JSON.stringify(r)} ${hubUrl('hf://a/b').href} ${await hasModelInCache('x')} ${cached}`;
}
