/**
 * HttpStream against a real local HTTP server that misbehaves on purpose: a dropped connection
 * is resumed with Range + If-Range; a server that cannot resume, a body that always ends early,
 * a stalled server, 404 and an oversized body each end in their error — never a silent short read.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import { randomBytes } from 'node:crypto';
import { HttpStream, fetchRange } from '../../src/net/http-stream.js';
import { NetworkError, NotFoundError } from '../../src/util/errors.js';

const DATA = randomBytes(3 << 20);

async function serve(
  handler: (req: IncomingMessage, res: ServerResponse) => void,
): Promise<{ url: string; close(): void }> {
  const srv = createServer(handler);
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}/o`,
    close: () => {
      srv.closeAllConnections();
      srv.close();
    },
  };
}

async function collect(s: HttpStream): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const b of s.body()) parts.push(b);
  return Buffer.concat(parts);
}

/** Serves DATA with ranges; `cut(n)` says where the n-th response breaks off (undefined: it does not). */
function ranged(cut: (n: number) => number | undefined, opts: { ranges?: boolean } = {}) {
  let n = 0;
  return (req: IncomingMessage, res: ServerResponse): void => {
    const etag = '"e1"';
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const ok = m && (opts.ranges ?? true) && req.headers['if-range'] === etag;
    const start = ok ? Number(m[1]) : 0;
    const end = ok && m[2] ? Number(m[2]) + 1 : DATA.length;
    const head: Record<string, string> = { etag, 'content-length': String(end - start) };
    if (ok) head['content-range'] = `bytes ${start}-${end - 1}/${DATA.length}`;
    res.writeHead(ok ? 206 : 200, head);
    const stop = cut(n++);
    if (stop === undefined) res.end(DATA.subarray(start, end));
    else res.write(DATA.subarray(start, Math.max(start, stop)), () => res.destroy());
  };
}

test('a dropped connection is resumed with a Range request, twice', async () => {
  const s = await serve(ranged((n) => (n === 0 ? 1 << 20 : n === 1 ? 2 << 20 : undefined)));
  try {
    const h = new HttpStream(s.url, { retries: 3 });
    assert.ok((await collect(h)).equals(DATA));
    assert.equal(h.info.resumed, 2);
    assert.equal(h.info.received, DATA.length);
  } finally {
    s.close();
  }
});

test('a server that cannot resume, and a body that always ends early, are refused', async () => {
  const noRange = await serve(ranged((n) => (n === 0 ? 1 << 20 : undefined), { ranges: false }));
  try {
    await assert.rejects(
      collect(new HttpStream(noRange.url)),
      (e: unknown) => e instanceof NetworkError && /cannot resume/.test(e.message),
    );
  } finally {
    noRange.close();
  }
  const short = await serve(ranged(() => DATA.length - 10));
  try {
    await assert.rejects(
      collect(new HttpStream(short.url, { retries: 2 })),
      (e: unknown) => e instanceof NetworkError && /broke off after \d+ of \d+ bytes 3 times/.test(e.message),
    );
  } finally {
    short.close();
  }
});

test('a stalled server counts as a drop; 404; a body over the bound', async () => {
  let first = true;
  const stall = await serve((req, res) => {
    if (first) {
      first = false;
      res.writeHead(200, { etag: '"e1"', 'content-length': String(DATA.length) });
      res.write(DATA.subarray(0, 4096)); // then nothing
      return;
    }
    ranged(() => undefined)(req, res);
  });
  try {
    const h = new HttpStream(stall.url, { idleMs: 300 });
    assert.ok((await collect(h)).equals(DATA));
    assert.equal(h.info.resumed, 1);
  } finally {
    stall.close();
  }
  const missing = await serve((_req, res) => res.writeHead(404).end());
  try {
    await assert.rejects(collect(new HttpStream(missing.url)), NotFoundError);
  } finally {
    missing.close();
  }
  const big = await serve(ranged(() => undefined));
  try {
    await assert.rejects(collect(new HttpStream(big.url, { maxBytes: 1 << 20 })), /more than the 1048576 allowed/);
  } finally {
    big.close();
  }
});

test('fetchRange reads a part, and refuses a server without Range support', async () => {
  const s = await serve(ranged(() => undefined));
  try {
    const got = await fetchRange(s.url, 1000, 5000, { headers: { 'if-range': '"e1"' } });
    assert.ok(got.equals(DATA.subarray(1000, 5000)));
  } finally {
    s.close();
  }
  const plain = await serve((_req, res) => res.writeHead(200, { 'content-length': String(DATA.length) }).end(DATA));
  try {
    await assert.rejects(fetchRange(plain.url, 0, 100), /does not answer Range requests/);
  } finally {
    plain.close();
  }
});
