#!/usr/bin/env node
// Builds the package's WebAssembly module from the Rust crate (the repository root):
//   1. cargo rustc --target wasm32-unknown-unknown (+simd128 from .cargo/config.toml) as a cdylib,
//      features `wasm` (the JS API) and `gpu` (wgpu's WebGPU backend);
//   2. wasm-bindgen --target web into npm/pkg (the CLI must be the crate's exact version);
//   3. wasm-opt from the npm `binaryen` package (Debian's binaryen 108 produces broken modules).
//   4. the threaded CPU module into npm/pkg/threads: the same steps with feature `wasm-threads`
//      on the pinned nightly (wasm atomics need `-Z build-std` with rust-src), shared memory.
// Options: --no-gpu (CPU only), --no-threads (skip step 4), --no-main (only step 4),
// --no-opt (skip wasm-opt),
// --debug (cargo dev profile). BITNET_WASM_NIGHTLY overrides the nightly toolchain.
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
const profile = release ? 'release' : 'debug';

/** Builds one module: cargo (extra argv/env), wasm-bindgen into `out`, wasm-opt. */
function buildModule({ cargoArgs, env = {}, wasmDir, out, optFlags = [] }) {
  run('cargo', cargoArgs, { env: { ...process.env, ...env } });
  const wasm = join(wasmDir, 'wasm32-unknown-unknown', profile, 'bitnet_inference.wasm');
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
      ...optFlags, bg, '-o', bg,
    ]);
  }
  console.log(`${bg}: ${(statSync(bg).size / 1e6).toFixed(2)} MB`);
}

const lib = ['--target', 'wasm32-unknown-unknown', '--lib', '--crate-type', 'cdylib', '--no-default-features'];
if (!args.has('--no-main')) {
  buildModule({
    cargoArgs: ['rustc', ...lib, '--features', features, ...(release ? ['--release'] : [])],
    wasmDir: targetDir,
    out: join(pkgDir, 'pkg'),
  });
}

if (!args.has('--no-threads')) {
  // The pinned nightly with rust-src: std rebuilt with atomics (the prebuilt one has none).
  const nightly = process.env.BITNET_WASM_NIGHTLY ?? 'nightly-2026-05-20';
  const threadsDir = join(targetDir, 'wasm-threads');
  buildModule({
    cargoArgs: [
      `+${nightly}`, 'rustc', '-Z', 'build-std=panic_abort,std', ...lib, '--features', 'wasm-threads',
      ...(release ? ['--release'] : []),
    ],
    env: {
      CARGO_TARGET_DIR: threadsDir,
      // Replaces .cargo/config.toml's flags for the target, so simd128 is repeated; 4 GiB of
      // shared memory at most (wasm32's limit).
      RUSTFLAGS: [
        '-C target-feature=+atomics,+bulk-memory,+mutable-globals,+simd128',
        ...['--shared-memory', '--import-memory', '--max-memory=4294967296', '--export=__wasm_init_tls',
          '--export=__tls_size', '--export=__tls_align', '--export=__tls_base'].map((a) => `-C link-arg=${a}`),
      ].join(' '),
    },
    wasmDir: threadsDir,
    out: join(pkgDir, 'pkg', 'threads'),
    optFlags: ['--enable-threads'],
  });
}
