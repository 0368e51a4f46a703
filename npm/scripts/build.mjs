#!/usr/bin/env node
// Builds the package's WebAssembly module from the Rust crate (the repository root):
//   1. cargo rustc --target wasm32-unknown-unknown (+simd128 from .cargo/config.toml) as a cdylib,
//      features `wasm` (the JS API) and `gpu` (wgpu's WebGPU backend);
//   2. wasm-bindgen --target web into npm/pkg (the CLI must be the crate's exact version);
//   3. wasm-opt from the npm `binaryen` package (Debian's binaryen 108 produces broken modules).
// Options: --no-gpu (CPU only), --no-opt (skip wasm-opt), --debug (cargo dev profile).
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkgDir = resolve(here, '..');
const root = resolve(pkgDir, '..');
const args = new Set(process.argv.slice(2));
const release = !args.has('--debug');
const features = args.has('--no-gpu') ? 'wasm' : 'wasm,gpu';

function run(cmd, argv, opts = {}) {
  console.log(`$ ${cmd} ${argv.join(' ')}`);
  execFileSync(cmd, argv, { stdio: 'inherit', cwd: root, ...opts });
}

// The wasm-bindgen crate version pinned in Cargo.toml must match the CLI exactly.
const cargoToml = readFileSync(join(root, 'Cargo.toml'), 'utf8');
const pinned = /wasm-bindgen = \{ version = "=([0-9.]+)"/.exec(cargoToml)?.[1];
let cli = '';
try {
  cli = execFileSync('wasm-bindgen', ['--version'], { encoding: 'utf8' }).trim().split(/\s+/)[1];
} catch {
  throw new Error(`wasm-bindgen CLI not found: cargo install wasm-bindgen-cli --version ${pinned}`);
}
if (pinned && cli !== pinned) {
  throw new Error(`wasm-bindgen CLI ${cli} does not match the crate's ${pinned}: ` +
    `cargo install wasm-bindgen-cli --version ${pinned}`);
}

const targetDir = process.env.CARGO_TARGET_DIR ? resolve(process.env.CARGO_TARGET_DIR) : join(root, 'target');
run('cargo', [
  'rustc', '--target', 'wasm32-unknown-unknown', '--lib', '--crate-type', 'cdylib',
  '--no-default-features', '--features', features, ...(release ? ['--release'] : []),
]);
const wasm = join(targetDir, 'wasm32-unknown-unknown', release ? 'release' : 'debug', 'bitnet_inference.wasm');
const out = join(pkgDir, 'pkg');
mkdirSync(out, { recursive: true });
run('wasm-bindgen', ['--target', 'web', '--out-dir', out, '--out-name', 'bitnet_inference', wasm]);

const bg = join(out, 'bitnet_inference_bg.wasm');
if (!args.has('--no-opt')) {
  const wasmOpt = join(pkgDir, 'node_modules', '.bin', 'wasm-opt');
  if (!existsSync(wasmOpt)) throw new Error('wasm-opt missing: run `npm ci` in npm/ first');
  run(wasmOpt, [
    '-O3', '--strip-debug', '--strip-producers',
    '--enable-simd', '--enable-bulk-memory', '--enable-mutable-globals', '--enable-sign-ext',
    '--enable-nontrapping-float-to-int', '--enable-reference-types', '--enable-multivalue',
    bg, '-o', bg,
  ]);
}
console.log(`${bg}: ${(statSync(bg).size / 1e6).toFixed(2)} MB`);
