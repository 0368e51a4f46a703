// Dawn (the WebGPU implementation inside Chrome) under Node, through the `webgpu` package:
// gives Node a `navigator.gpu` so the package's WebGPU path runs as in a browser.
// `installDawn()` resolves to the adapter's description, or null where Dawn finds no hardware
// adapter (software ones are not used: the tests and benchmarks want the real GPU).

export async function installDawn() {
  let dawn;
  try {
    dawn = await import('webgpu');
  } catch {
    return null;
  }
  Object.assign(globalThis, dawn.globals);
  // wgpu's web backend looks for a window global before it reads navigator.gpu.
  globalThis.Window ??= class Window {};
  const gpu = dawn.create(['backend=vulkan']);
  Object.defineProperty(globalThis, 'navigator', { value: { gpu }, configurable: true, writable: true });
  let adapter = null;
  try {
    adapter = await gpu.requestAdapter({ powerPreference: 'high-performance' });
  } catch {
    adapter = null;
  }
  const info = adapter?.info ?? {};
  const label = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(' ');
  if (!adapter || info.isFallbackAdapter || /swiftshader|llvmpipe|lavapipe/i.test(label)) return null;
  return label || 'WebGPU adapter';
}
