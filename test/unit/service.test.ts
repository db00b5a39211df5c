/**
 * The service without QEMU: the OpenAPI document served is docs/openapi.json, tokens (and
 * their revocation), patterns that refuse traversal, the port allocator under concurrency, the
 * upload counter, the synthesis semaphore, discovery ranking, mDNS TXT round trip, and the
 * libvirt domain XML.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { TokenFile, bearer } from '../../src/service/auth.js';
import { buildServer } from '../../src/service/server.js';
import { limitBytes, Semaphore } from '../../src/service/limits.js';
import { PortAllocator } from '../../src/service/ports.js';
import { rank, type DiscoveredCloudlet } from '../../src/api/discover.js';
import { parseTxt, txtOf } from '../../src/discovery/mdns.js';
import { domainXml } from '../../src/vm/libvirt.js';
import { runPaths } from '../../src/vm/argv.js';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

async function server(): Promise<{ app: Awaited<ReturnType<typeof buildServer>>['app']; token: string; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'clo-svc-unit-'));
  const token = 'unit-token-123';
  await writeFile(join(dir, 'tokens'), `${token}\n`);
  const s = await buildServer({
    root: join(dir, 'lib'),
    name: 'unit',
    url: 'http://127.0.0.1:1',
    tokens: await TokenFile.open(join(dir, 'tokens')),
    maxUpload: 1024,
    maxSyntheses: 1,
    ports: { first: 30000, last: 30010 },
    forwardHost: '127.0.0.1',
    launcher: 'qemu',
    readyTimeoutMs: 1000,
    directory: false,
  });
  return { app: s.app, token, dir };
}

test('service: the OpenAPI document served is docs/openapi.json', async () => {
  const { app, token, dir } = await server();
  try {
    const r = await app.inject({
      method: 'GET',
      url: '/v1/openapi.json',
      headers: { authorization: `Bearer ${token}` },
    });
    assert.equal(r.statusCode, 200);
    const doc = JSON.parse(await readFile(join(ROOT, 'docs', 'openapi.json'), 'utf8')) as unknown;
    assert.deepEqual(r.json(), doc, 'docs/openapi.json is stale: npm run openapi');
  } finally {
    await app.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('service: health is open, everything else needs the token; bad fields are 400 with the CLI error object', async () => {
  const { app, token, dir } = await server();
  try {
    assert.equal((await app.inject({ url: '/v1/health' })).statusCode, 200);
    const no = await app.inject({ url: '/v1/bases' });
    assert.equal(no.statusCode, 401);
    assert.match(String(no.headers['www-authenticate']), /^Bearer/);
    assert.equal(no.json<{ exit_code: number }>().exit_code, 15);
    const auth = { authorization: `Bearer ${token}` };
    assert.equal((await app.inject({ url: '/v1/bases', headers: auth })).statusCode, 200);
    for (const url of ['/v1/bases/..%2F..%2Fetc', '/v1/instances/..', '/v1/instances/i-a%2F..%2F..']) {
      const r = await app.inject({ url, headers: auth });
      assert.ok([400, 404].includes(r.statusCode), `${url}: ${r.statusCode}`);
      assert.match(r.json<{ code: string }>().code, /^(UsageError|NotFoundError)$/);
    }
    const big = await app.inject({
      method: 'POST',
      url: '/v1/instances?base=demo&guest_port=80',
      headers: { ...auth, 'content-type': 'application/octet-stream', 'content-length': '2048' },
      payload: Buffer.alloc(2048),
    });
    assert.equal(big.statusCode, 413);
  } finally {
    await app.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('service: a token removed from the file is refused at once (compared as digests)', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'clo-tok-'));
  try {
    const f = join(dir, 't');
    await writeFile(f, '# ops\nalpha\nbeta\n');
    const t = await TokenFile.open(f);
    assert.ok(await t.accepts('alpha'));
    assert.ok(await t.accepts('beta'));
    assert.ok(!(await t.accepts('alph')));
    assert.ok(!(await t.accepts(undefined)));
    await new Promise((r) => setTimeout(r, 20));
    await writeFile(f, 'beta\n');
    assert.ok(!(await t.accepts('alpha')), 'revoked');
    assert.equal(bearer('Bearer  abc '), 'abc');
    assert.equal(bearer('Basic abc'), undefined);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
});

test('service: concurrent port allocations never collide; a semaphore; the upload counter', async () => {
  const p = new PortAllocator({ first: 31000, last: 31039 }, '127.0.0.1');
  const got = await Promise.all(Array.from({ length: 40 }, (_, i) => p.allocate(1, `o${i}`)));
  const flat = got.flat();
  assert.equal(new Set(flat).size, 40);
  await assert.rejects(p.allocate(1, 'extra'), /no free host port/);
  p.release('o3');
  assert.equal((await p.allocate(1, 'again'))[0], flat[3]);
  const s = new Semaphore(2);
  const r1 = s.tryAcquire();
  const r2 = s.tryAcquire();
  assert.ok(r1 && r2 && s.tryAcquire() === undefined);
  r1();
  r1();
  assert.equal(s.inUse, 1);
  async function* chunks(): AsyncGenerator<Uint8Array> {
    for (let i = 0; i < 10; i++) yield new Uint8Array(100);
  }
  let n = 0;
  await assert.rejects(
    (async () => {
      for await (const c of limitBytes(chunks(), 550)) n += c.length;
    })(),
    /larger than the 550 bytes/,
  );
  assert.equal(n, 500);
});

test('discover: ranking by base, then RTT (5 ms steps), then free memory; mDNS TXT round trip', () => {
  const c = (name: string, has: boolean, rtt: number | null, mem: number): DiscoveredCloudlet => ({
    name,
    url: `http://${name}`,
    via: 'directory',
    has_base: has,
    rtt_ms: rtt,
    reachable: rtt !== null,
    mem_free_bytes: mem,
    cpus: 2,
    load1: 0,
    bases: [],
  });
  const order = rank([
    c('far', true, 40, 9),
    c('nobase', false, 1, 9),
    c('near', true, 2, 1),
    c('near2', true, 3, 5),
    c('down', true, null, 9),
  ]);
  assert.deepEqual(
    order.map((x) => x.name),
    ['near2', 'near', 'far', 'nobase', 'down'],
  );
  const id = 'a'.repeat(64);
  const a = { name: 'x', url: 'http://127.0.0.1:9/', port: 9, bases: [id], memFree: 5, cpus: 2, load: 0.5 };
  assert.deepEqual(parseTxt('x', 9, txtOf(a)), a);
  assert.equal(parseTxt('x', 9, ['url=file:///etc']), undefined);
});

test('libvirt: the domain XML passes the devices through, swaps the RAM, escapes what it quotes', () => {
  const x = domainXml(
    {
      machine: 'pc-q35-7.2',
      memoryMiB: 128,
      kernel: "/b/k'&<",
      drives: [
        {
          file: '/i/disk.qcow2',
          format: 'qcow2',
          if: 'virtio',
          backing: { kind: 'image', file: '/b/disk.raw', format: 'raw' },
        },
      ],
      network: { forwards: [{ hostPort: 2000, guestPort: 80 }] },
      memoryBackendFile: { path: '/b/ram', share: false },
      incoming: { from: 'unix', path: '/s/m.sock' },
    },
    { name: 'cloudlet-i-1', accel: 'tcg', emulator: '/w/qemu-wrapper', paths: runPaths('/i'), uid: 0, gid: 0 },
  );
  assert.match(x, /<domain type='qemu'/);
  assert.match(x, /<kernel>\/b\/k&apos;&amp;&lt;<\/kernel>/);
  assert.match(x, /<qemu:arg value='-incoming'\/>\s*<qemu:arg value='defer'\/>/);
  assert.match(x, /hostfwd=tcp:127.0.0.1:2000-:80/);
  assert.match(x, /node-name=disk0-back/);
  assert.match(
    x,
    /<qemu:env name='CLOUDLET_MAIN_RAM' value='memory-backend-file,id=pc.ram,size=128M,mem-path=\/b\/ram,share=off'\/>/,
  );
  assert.match(x, /<serial type='pty'>/);
  assert.match(x, /<seclabel type='static' model='dac' relabel='no'>/);
});
