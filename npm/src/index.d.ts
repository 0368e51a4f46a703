// Types of the bitnet-inference package.

/** Where a model comes from. */
export type ModelSource =
  /** A model directory URL (config.json, model.safetensors or model.safetensors.index.json +
   * shards, tokenizer.json, tokenizer_config.json, generation_config.json, chat_template.jinja),
   * or the URL of its model.safetensors, or a Hugging Face Hub reference
   * `hf://owner/name[@revision][/sub/dir]` (see `hfEndpoint`, `hfToken`). In Node: also a local directory path or file: URL. */
  | string
  | URL
  /** The files of a model directory (e.g. an `<input type=file multiple>`). */
  | FileList
  | File[]
  /** File name → contents (bytes, a Blob/File, or a URL to fetch). */
  | Record<string, Uint8Array | ArrayBuffer | Blob | string | URL>;

export type BackendChoice = 'auto' | 'webgpu' | 'cpu';

export interface LoadProgress {
  /** `download` while files are read, `load` while the engine prepares the weights, then `ready`. */
  phase: 'download' | 'load' | 'ready';
  /** The file being read (download phase). */
  file: string | null;
  /** Bytes read so far over all files. */
  loaded: number;
  /** Total bytes of the files whose size is known so far (0 when unknown). */
  total: number;
  fileLoaded?: number;
  fileTotal?: number;
}

export interface LoadOptions {
  /** `auto` (default): WebGPU where `navigator.gpu` works, else the CPU (see `info.fallbackReason`). */
  backend?: BackendChoice;
  onProgress?: (p: LoadProgress) => void;
  /** Keep downloaded files in the browser cache (Cache API) and reuse them; default true.
   * Each file's size and SHA-256 are recorded and checked before use. */
  cache?: boolean;
  /** Where `cache` keeps the files: 'cache-api' (default) or 'opfs' (the origin private file
   * system). Either way each file's size and SHA-256 are recorded and checked before use. */
  storage?: 'cache-api' | 'opfs';
  /** Positions of the KV cache (default: min(max_position_embeddings, 2048)). */
  contextLength?: number;
  /** Use WebGPU subgroup operations where the browser exposes the `subgroups` feature with
   * one fixed subgroup size (default true; false forces the workgroup-memory reductions). */
  subgroups?: boolean;
  /** The CPU path's threads (default 'auto': one per core, up to 8, where the threaded module
   * can run — a Web Worker of a cross-origin-isolated page, the CPU path certain — else 1;
   * `info.threadsReason` says why it is 1). A number asks for exactly that many and is an
   * error where threads cannot run. */
  threads?: 'auto' | number;
  /** The CPU path's kernels (default: the fastest, simd128). */
  kernels?: 'auto' | 'simd128' | 'scalar';
  /** Caps the WebGPU shards of the embedding/head below the device's binding limit (testing). */
  maxBindingBytes?: number;
  /** Cancels the download. */
  signal?: AbortSignal;
  /** The Hub that `hf://` references resolve against (default https://huggingface.co). */
  hfEndpoint?: string;
  /** A Hub access token for gated or private repositories, sent only to `hfEndpoint`. */
  hfToken?: string;
  /** A fetch implementation (default: globalThis.fetch; not used by loadInWorker). */
  fetch?: typeof fetch;
  /** The model name reported by chat completions (default: the source URL). */
  name?: string;
  /** Where the .wasm comes from (default: next to the package's JS). */
  wasm?: string | URL | Uint8Array | WebAssembly.Module;
  /** loadInWorker only: the worker script URL (default: the package's worker.js). */
  workerUrl?: string | URL;
}

/** config.json as the engine read it. */
export interface ModelConfigJson {
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  max_position_embeddings: number;
  [key: string]: unknown;
}

export interface ModelInfo {
  backend: 'webgpu' | 'cpu';
  /** A description of the adapter or CPU kernels. */
  device: string;
  /** The CPU kernel set ('simd128' or 'scalar'); null on WebGPU. */
  kernels: string | null;
  /** Why `auto` did not use WebGPU (null when it did, or when the CPU was asked for): no
   * WebGPU, or a software fallback adapter (e.g. SwiftShader), slower than the CPU path. */
  fallbackReason: string | null;
  /** CPU path: the threads it runs on (null on WebGPU). */
  threads: number | null;
  /** CPU path on one thread: why (e.g. the page is not cross-origin isolated); else null. */
  threadsReason?: string | null;
  /** Why the downloaded files could not be cached (e.g. the storage quota), else null. */
  cacheWarning: string | null;
  /** WebGPU adapter details from the browser. */
  adapter?: { vendor: string; architecture: string; description: string };
  contextLength: number;
  fileBytes: number;
  decodeBytesPerToken: number;
  hasTokenizer: boolean;
  hasChatTemplate: boolean;
  eosTokenIds: number[];
  bosTokenId: number | null;
  config: ModelConfigJson;
  version: string;
}

export interface GenerateOptions {
  /** Most new tokens (default 128). */
  maxTokens?: number;
  /** 0 (default) is greedy. */
  temperature?: number;
  topK?: number;
  topP?: number;
  minP?: number;
  repetitionPenalty?: number;
  /** OpenAI's presence penalty: subtracted once from the logit of every generated token (−2..2). */
  presencePenalty?: number;
  /** OpenAI's frequency penalty: subtracted per time a token was generated (−2..2). */
  frequencyPenalty?: number;
  /** Token id → bias added to its logit (−100..100). */
  logitBias?: Record<string, number>;
  /** Structured output: the text is JSON valid against this schema (constrained decoding). */
  jsonSchema?: object;
  /** Structured output: the text follows this Lark grammar. */
  grammar?: string;
  /** Structured output: the text matches this regular expression. */
  regex?: string;
  /** A non-negative integer for reproducible sampling. */
  seed?: number;
  /** Strings that end the generation (the text is cut before them). */
  stop?: string | string[];
  /** Keep going past end-of-sequence tokens. */
  ignoreEos?: boolean;
  /** End-of-sequence ids (default: generation_config.json's). */
  eosTokenIds?: number[];
  /**
   * Generate past the context: keep this many recent positions (with `sinks`, at most the
   * context) and evict older ones a window/8 at a time, keys re-rotated (StreamingLLM).
   */
  window?: number;
  /** Attention sinks: the first positions kept for good (with `window`; default 4). */
  sinks?: number;
  /** Stops the generation: the iterator throws an AbortError. */
  signal?: AbortSignal;
  /** For string prompts: add BOS etc. (default true). */
  addSpecialTokens?: boolean;
  /** Yield to the event loop every n tokens (default 1). */
  yieldEvery?: number;
}

export interface Timings {
  prefillSeconds: number;
  decodeSeconds: number;
  /** Decode speed: tokens after the first over their time. */
  tokensPerSecond: number;
  prefillTokensPerSecond: number;
}

export interface GenerateChunk {
  /** New text (may be '' while a multi-byte character or a possible stop string is held back). */
  text: string;
  /** The token id, or null when the step ended the generation at an end-of-sequence token. */
  token: number | null;
  done: boolean;
  /** On the last chunk. */
  finishReason?: 'stop' | 'length' | 'cancelled';
  promptTokens?: number;
  completionTokens?: number;
  usage?: { promptTokens: number; completionTokens: number };
  timings?: Timings;
}

export interface GenerateResult {
  text: string;
  tokens: number[];
  finishReason: 'stop' | 'length' | 'cancelled';
  usage: { promptTokens: number; completionTokens: number };
  timings: Timings;
}

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | string;
  content: string | Array<{ type?: string; text?: string }>;
}

/** A prompt: text (BOS added), token ids, or chat messages (the model's chat template). */
export type Prompt = string | number[] | Uint32Array | { messages: ChatMessage[] };

export interface ChatCompletionRequest {
  messages: ChatMessage[];
  stream?: boolean;
  stream_options?: { include_usage?: boolean };
  max_tokens?: number;
  max_completion_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  min_p?: number;
  repetition_penalty?: number;
  seed?: number;
  stop?: string | string[];
  signal?: AbortSignal;
  /** Accepted and ignored (the loaded model answers). */
  model?: string;
}

export interface ChatCompletionUsage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface ChatCompletion {
  id: string;
  object: 'chat.completion';
  created: number;
  model: string;
  choices: Array<{
    index: number;
    message: { role: 'assistant'; content: string };
    finish_reason: 'stop' | 'length';
  }>;
  usage?: ChatCompletionUsage;
  timings?: Timings;
}

export interface ChatCompletionChunk {
  id: string;
  object: 'chat.completion.chunk';
  created: number;
  model: string;
  choices: Array<{
    index: number;
    delta: { role?: 'assistant'; content?: string };
    finish_reason: 'stop' | 'length' | null;
  }>;
  usage?: ChatCompletionUsage;
  timings?: Timings;
}

export interface Chat {
  completions: {
    create(req: ChatCompletionRequest & { stream: true }): Promise<AsyncIterable<ChatCompletionChunk>>;
    create(req: ChatCompletionRequest & { stream?: false }): Promise<ChatCompletion>;
    create(req: ChatCompletionRequest): Promise<ChatCompletion | AsyncIterable<ChatCompletionChunk>>;
  };
}

/** A model loaded in this thread ({@link BitNet.load}). Calls on one model run one at a time. */
export declare class BitNetModel {
  readonly info: ModelInfo;
  readonly backend: 'webgpu' | 'cpu';
  readonly chat: Chat;
  encode(text: string, opts?: { addSpecialTokens?: boolean }): number[];
  decode(ids: ArrayLike<number>, opts?: { skipSpecialTokens?: boolean }): string;
  applyChatTemplate(messages: ChatMessage[], opts?: { addGenerationPrompt?: boolean }): string;
  tokenize(input: Prompt, opts?: { addSpecialTokens?: boolean }): number[];
  generate(input: Prompt, opts?: GenerateOptions): AsyncGenerator<GenerateChunk, void, void>;
  generateText(input: Prompt, opts?: GenerateOptions): Promise<GenerateResult>;
  /** Logits of the last prompt position (vocab_size values). */
  logits(input: Prompt): Promise<Float32Array>;
  dispose(): void;
}

/** A model hosted in a Web Worker ({@link BitNet.loadInWorker}): the same API, async throughout. */
export interface WorkerModel {
  readonly info: ModelInfo;
  readonly backend: 'webgpu' | 'cpu';
  readonly chat: Chat;
  encode(text: string, opts?: { addSpecialTokens?: boolean }): Promise<number[]>;
  decode(ids: ArrayLike<number>, opts?: { skipSpecialTokens?: boolean }): Promise<string>;
  applyChatTemplate(messages: ChatMessage[], opts?: { addGenerationPrompt?: boolean }): Promise<string>;
  tokenize(input: Prompt, opts?: { addSpecialTokens?: boolean }): Promise<number[]>;
  generate(input: Prompt, opts?: GenerateOptions): AsyncGenerator<GenerateChunk, void, void>;
  generateText(input: Prompt, opts?: GenerateOptions): Promise<GenerateResult>;
  logits(input: Prompt): Promise<Float32Array>;
  /** Frees the model and terminates the worker. */
  dispose(): void;
}

export interface KernelSelfTest {
  kernels: string[];
  cases: number;
  failures: string[];
}

export declare const BitNet: {
  load(source: ModelSource, opts?: LoadOptions): Promise<BitNetModel>;
  loadInWorker(source: ModelSource, opts?: LoadOptions): Promise<WorkerModel>;
  version(): Promise<string>;
  kernelSelfTest(): Promise<KernelSelfTest>;
  hasWebGPU(): boolean;
  readonly isNode: boolean;
};
export default BitNet;

export interface CachedModel {
  url: string;
  /** The store that holds it. */
  storage: 'cache-api' | 'opfs';
  files: Array<{ name: string; bytes: number; sha256: string }>;
  bytes: number;
  cachedAt: string;
}

/** Models kept by earlier loads, in the Cache API and in OPFS (empty where neither exists). */
export declare function listCachedModels(): Promise<CachedModel[]>;
/** Whether the model at `url` is cached with every file its manifest lists (each file's size
 * and SHA-256 are checked again when it is loaded; damaged entries are downloaded again). */
export declare function hasModelInCache(url: string | URL): Promise<boolean>;
/** The Hub's default endpoint, `https://huggingface.co`. */
export declare const HF_ENDPOINT: string;
/** The directory URL that `hf://owner/name[@revision][/sub/dir]` resolves to on `endpoint`. */
export declare function hubUrl(ref: string, endpoint?: string): URL;
/** Deletes the cached files of the model at `url`; resolves to whether anything was deleted. */
export declare function deleteCachedModel(url: string | URL): Promise<boolean>;
/** Deletes every cached model. */
export declare function clearModelCache(): Promise<boolean>;
/** Whether `navigator.gpu` exists here. */
export declare function hasWebGPU(): boolean;
/** Instantiates the WebAssembly module ahead of the first load (optional). */
export declare function initWasm(source?: string | URL | Uint8Array | WebAssembly.Module): Promise<unknown>;
