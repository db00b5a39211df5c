/**
 * Uploads never end short: a source that fails mid-way aborts the request (Glance would call a
 * cleanly ended chunked body complete), the size and sha256 reported are those of the bytes
 * sent, and tar's failure reaches the upload as an error rather than as a short, clean end.
 * Against a small local HTTP server standing in for Glance's PUT /v2/images/ID/file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { createServer } from 'node:http';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { GlanceClient } from '../../src/glance/client.js';
import { tarStream } from '../../src/base/library.js';
import { CorruptInputError, NetworkError } from '../../src/util/errors.js';

interface Received {
  bytes: number;
  sha256: string;
  complete: boolean;
  chunked: boolean;
  token?: string;
}

async function fakeGlance(): Promise<{ client: GlanceClient; received: Received[]; close: () => Promise<void> }> {
  const received: Received[] = [];
  const server = createServer((req, res) => {
    const h = createHash('sha256');
    let bytes = 0;
    req.on('data', (c: Buffer) => {
      bytes += c.length;
      h.update(c);
    });
    const done = (complete: boolean): void => {
      received.push({
        bytes,
        sha256: h.digest('hex'),
        complete,
        chunked: req.headers['transfer-encoding'] === 'chunked',
        token: req.headers['x-auth-token'] as string | undefined,
      });
    };
    req.on('end', () => {
      done(true);
      res.writeHead(204).end();
    });
    req.on('aborted', () => done(false));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const endpoint = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  return {
    client: new GlanceClient({ endpoint, token: 'tok', auth: 'token' }),
    received,
    close: () => new Promise<void>((r) => server.close(() => r())),
  };
}

const settle = (): Promise<void> => new Promise((r) => setTimeout(r, 100));

test('upload: streamed with the token; bytes and sha256 are what was sent', async () => {
  const g = await fakeGlance();
  try {
    const data = Buffer.alloc(3 << 20, 7);
    const r = await g.client.upload(
      'i1',
      Readable.from([data.subarray(0, 1 << 20), data.subarray(1 << 20)]),
      data.length,
    );
    assert.deepEqual(r, { bytes: data.length, sha256: createHash('sha256').update(data).digest('hex') });
    assert.deepEqual(g.received, [
      { bytes: data.length, sha256: r.sha256, complete: true, chunked: false, token: 'tok' },
    ]);
    const chunked = await g.client.upload('i2', Readable.from([Buffer.from('abc')]), undefined);
    assert.equal(chunked.bytes, 3);
    assert.equal(g.received[1]!.chunked, true, 'unknown size: chunked');
  } finally {
    await g.close();
  }
});

test('upload: a source that fails mid-way aborts the request (never a short, clean end)', async () => {
  const g = await fakeGlance();
  try {
    async function* failing(): AsyncGenerator<Buffer> {
      yield Buffer.alloc(256 << 10, 1);
      await new Promise((r) => setTimeout(r, 20));
      throw new Error('disk read failed');
    }
    await assert.rejects(
      g.client.upload('i3', Readable.from(failing()), undefined),
      (e: unknown) => e instanceof NetworkError && /failed after \d+ bytes/.test(e.message),
    );
    await settle();
    assert.equal(g.received.length, 1);
    assert.equal(g.received[0]!.complete, false, 'the server saw an aborted body');
  } finally {
    await g.close();
  }
});

test('tar stream: a failing tar is an error, also to the upload; a good one ends cleanly', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-tar-'));
  const g = await fakeGlance();
  try {
    await writeFile(join(dir, 'a'), 'hello');
    let n = 0;
    for await (const c of tarStream('tar', ['-cf', '-', '-C', dir, 'a'])) n += (c as Buffer).length;
    assert.equal(n % 512, 0);
    assert.ok(n >= 1024);
    await assert.rejects(
      g.client.upload('i4', tarStream('tar', ['-cf', '-', '-C', dir, 'a', 'missing']), undefined),
      (e: unknown) => e instanceof CorruptInputError && /tar failed/.test(e.message),
    );
    await settle();
    assert.equal(g.received.at(-1)?.complete, false, 'the upload of a failed tar was aborted');
  } finally {
    await g.close();
    await rm(dir, { recursive: true, force: true });
  }
});
