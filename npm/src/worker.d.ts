// The worker entry has no exports: start it with
//   new Worker(new URL('bitnet-inference/worker', import.meta.url), { type: 'module' })
// or simply use BitNet.loadInWorker(), which does so and speaks its message protocol.
export {};
