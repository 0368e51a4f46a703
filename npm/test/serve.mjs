// A static file server for the tests: serves a directory on 127.0.0.1 (a secure context for
// WebGPU and the Cache API), GET/HEAD only, no directory listings, nothing outside the root.
// Paths under `/__broken__/` serve the same files but cut every body larger than 64 KiB off
// after half its announced length (a download interrupted mid-file). Paths under
// `/__isolated__/` serve the same files with the headers that make a page cross-origin isolated
// (COOP same-origin, COEP require-corp): SharedArrayBuffer, so the threaded CPU module.
import { createServer } from 'node:http';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { extname, join, normalize, sep } from 'node:path';

const TYPES = {
  '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8',
  '.mjs': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8',
  '.json': 'application/json', '.wasm': 'application/wasm', '.png': 'image/png',
  '.svg': 'image/svg+xml', '.jinja': 'text/plain; charset=utf-8', '.ts': 'text/plain; charset=utf-8',
};

export function serve(root) {
  const server = createServer(async (req, res) => {
    if (req.method !== 'GET' && req.method !== 'HEAD') {
      res.writeHead(405).end();
      return;
    }
    let path;
    let broken = false;
    let isolated = false;
    try {
      path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
      if (path.startsWith('/__broken__/')) {
        broken = true;
        path = path.slice('/__broken__'.length);
      } else if (path.startsWith('/__isolated__/')) {
        isolated = true;
        path = path.slice('/__isolated__'.length);
      }
    } catch {
      res.writeHead(400).end();
      return;
    }
    let file = normalize(join(root, path));
    if (file !== root && !file.startsWith(root.endsWith(sep) ? root : root + sep)) {
      res.writeHead(403).end();
      return;
    }
    try {
      let s = await stat(file);
      if (s.isDirectory()) {
        file = join(file, 'index.html');
        s = await stat(file);
      }
      res.writeHead(200, {
        'content-type': TYPES[extname(file)] ?? 'application/octet-stream',
        'content-length': s.size,
        'cache-control': 'no-store',
        ...(isolated ? { 'cross-origin-opener-policy': 'same-origin', 'cross-origin-embedder-policy': 'require-corp' } : {}),
      });
      if (req.method === 'HEAD') res.end();
      else if (broken && s.size > 65536) {
        createReadStream(file, { end: Math.floor(s.size / 2) }).on('end', () => res.destroy()).pipe(res, { end: false });
      } else createReadStream(file).pipe(res);
    } catch {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found');
    }
  });
  return new Promise((resolve) => {
    server.listen(0, '127.0.0.1', () => resolve({ server, url: `http://127.0.0.1:${server.address().port}` }));
  });
}
