/**
 * The cloudlet as a service, end to end on real QEMU under libvirt: a directory and two
 * cloudlets (three `serve` processes, separate libraries); a client discovers them, synthesizes
 * on the one holding the base, reaches the guest through the returned forward, the instance is
 * a libvirt domain (`virsh list`), it is handed off to the other cloudlet and the guest's RAM
 * token survives. Then the attacks: no or wrong token, a 10 GiB upload, path traversal in
 * every field, 20 concurrent syntheses against a limit of 2.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { ensureDemoVm, freePort, parseStatus, captureDemoBase } from '../helpers/demo-vm.js';
import { BIN, cli, ok, stopAllInstances } from '../helpers/cli.js';
import { findQemu } from '../helpers/tiny-qemu.js';

const hasQemu = findQemu() !== null;
if (!hasQemu && process.env.CI) throw new Error('QEMU is required in CI');

function sh(cmd: string, args: string[]): Promise<{ code: number; out: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: 30_000 }, (err, stdout, stderr) =>
      resolve({ code: err ? 1 : 0, out: `${stdout}${stderr}` }),
    );
  });
}

const virshOk = async (): Promise<boolean> => (await sh('virsh', ['-c', 'qemu:///system', 'uri'])).code === 0;

let work: string;
let token: string;
let baseId = '';
let baseToken = '';
let overlay = '';
let pkg = '';
const started: string[] = [];
const servers: ChildProcess[] = [];
const urls: { dir: string; a: string; b: string } = { dir: '', a: '', b: '' };
let skip: string | false = hasQemu ? false : 'QEMU not found';

/** Starts `serve` and resolves with its URL (the first line on stdout). */
async function serve(lib: string, args: string[]): Promise<string> {
  const child = spawn(process.execPath, [BIN, '--json', 'serve', '--listen', '127.0.0.1:0', ...args], {
    env: { ...process.env, CLOUDLET_LIBRARY: lib, CLOUDLET_TOKEN: token },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  servers.push(child);
  const lines = createInterface({ input: child.stdout });
  const [line] = (await Promise.race([
    once(lines, 'line'),
    once(child, 'exit').then(() => {
      throw new Error(`serve ${args.join(' ')} exited`);
    }),
  ])) as [string];
  return String((JSON.parse(line) as { url: string }).url);
}

interface Raw {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
  /** Bytes the client managed to send. */
  sent: number;
}

/** A raw HTTP request (paths sent as they are, bodies as given), as an attacker would. */
function raw(
  base: string,
  method: string,
  path: string,
  opts: {
    token?: string;
    json?: unknown;
    contentLength?: number;
    chunk?: Buffer;
    contentType?: string;
    /** Send `Expect: 100-continue` and pump the body only after the 100. */
    expect?: boolean;
  } = {},
): Promise<Raw> {
  const u = new URL(base);
  const headers: Record<string, string> = {};
  if (opts.token) headers['authorization'] = `Bearer ${opts.token}`;
  let body: Buffer | undefined;
  if (opts.json !== undefined) {
    body = Buffer.from(JSON.stringify(opts.json));
    headers['content-type'] = 'application/json';
  }
  if (opts.contentType) headers['content-type'] = opts.contentType;
  if (opts.contentLength !== undefined) headers['content-length'] = String(opts.contentLength);
  if (opts.expect) headers['expect'] = '100-continue';
  return new Promise((resolve, reject) => {
    let sent = 0;
    let answered = false;
    const req = request({ host: u.hostname, port: u.port, method, path, headers }, (res) => {
      answered = true;
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (c: string) => (text += c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text, sent }));
    });
    req.on('error', (err) => {
      if (!answered) reject(err);
    });
    if (body) req.end(body);
    else if (opts.chunk && opts.contentLength) {
      const chunk = opts.chunk;
      const pump = (): void => {
        while (!answered && sent < opts.contentLength! && req.write(chunk)) sent += chunk.length;
        if (!answered && sent < opts.contentLength!) req.once('drain', pump);
      };
      if (opts.expect) req.once('continue', pump);
      else pump();
    } else req.end();
  });
}

before(async () => {
  if (skip) return;
  if (!(await virshOk())) {
    // Start the daemons ourselves (as CI does) when libvirt is installed but not running.
    if ((await sh('sh', ['-c', 'command -v libvirtd'])).code === 0) {
      for (const d of ['virtlogd', 'libvirtd']) {
        if ((await sh('pgrep', ['-x', d])).code !== 0) {
          await sh(d, ['-d']);
          started.push(d);
        }
      }
      for (let i = 0; i < 50 && !(await virshOk()); i++) await new Promise((r) => setTimeout(r, 100));
    }
    if (!(await virshOk())) {
      if (process.env.CI) throw new Error('libvirt is required in CI (scripts/setup.sh installs it)');
      skip = 'no libvirt daemon';
      console.error('\n*** libvirt not reachable: skipping the service end-to-end test ***\n');
      return;
    }
  }
  work = await mkdtemp(join(tmpdir(), 'clo-svc-'));
  token = `t-${Math.random().toString(36).slice(2)}${Math.random().toString(36).slice(2)}`;
  await writeFile(join(work, 'tokens'), `# cloudlet tokens\n${token}\n`);
  await ensureDemoVm();

  // A base and an overlay (the synthesis test's flow, shortened).
  const libA = join(work, 'libA');
  const env = { ...process.env, CLOUDLET_LIBRARY: libA, CLOUDLET_LAUNCHER: 'qemu' };
  const captured = await captureDemoBase(env, join(work, 'boot'));
  baseToken = captured.status.token;
  baseId = captured.id;
  const p0 = await freePort();
  const iid = String(
    ok(await cli(['launch', 'demo', '--customize', '--forward', `${p0}:8080`], env), 'launch').instance,
  );
  ok(
    await cli(['console', iid, '--run', 'echo svc-marker > /mnt/marker && seq 1 20000 > /mnt/numbers && sync'], env),
    'console',
  );
  ok(await cli(['snapshot', '--instance', iid, '-o', join(work, 'custom'), '--then', 'quit'], env), 'snapshot');
  ok(await cli(['stop', iid], env), 'stop');
  overlay = join(work, 'app.overlay');
  ok(
    await cli(
      [
        'create',
        '--base',
        'demo',
        '--disk',
        join(work, 'custom', 'disk.qcow2'),
        '--memory',
        join(work, 'custom', 'memory.stream'),
        '-o',
        overlay,
      ],
      env,
    ),
    'create',
  );
  pkg = join(work, 'demo.pkg');
  ok(await cli(['base', 'export', 'demo', '-o', pkg], env), 'export');

  const tokens = join(work, 'tokens');
  urls.dir = await serve(join(work, 'libD'), ['--directory', '--token-file', tokens, '--name', 'dir']);
  const common = ['--token-file', tokens, '--register', urls.dir, '--heartbeat', '1s', '--launcher', 'libvirt'];
  urls.a = await serve(libA, [
    ...common,
    '--name',
    'cloudlet-a',
    '--ports',
    '23000-23049',
    '--max-syntheses',
    '2',
    '--max-upload',
    '8M',
  ]);
  urls.b = await serve(join(work, 'libB'), [...common, '--name', 'cloudlet-b', '--ports', '23050-23099']);
});

after(async () => {
  if (!work) return;
  for (const lib of ['libA', 'libB']) {
    await stopAllInstances({ ...process.env, CLOUDLET_LIBRARY: join(work, lib) });
  }
  for (const s of servers) s.kill('SIGTERM');
  await Promise.all(servers.map((s) => (s.exitCode === null ? once(s, 'exit') : Promise.resolve())));
  // Daemons this test started are stopped again (other tests see the machine as it was).
  for (const d of started.reverse()) {
    const pid = (await sh('pgrep', ['-x', d])).out.trim().split('\n')[0];
    if (pid) process.kill(Number(pid), 'SIGTERM');
  }
  await rm(work, { recursive: true, force: true });
});

test(
  'discover → synthesize on the cloudlet with the base → libvirt domain → handoff; the RAM token survives',
  { skip, timeout: 240_000 },
  async (t) => {
    const env = { ...process.env, CLOUDLET_TOKEN: token };
    // Both cloudlets heartbeat to the directory; only A holds the base: A ranks first.
    let found: Array<{ name: string; url: string; has_base: boolean; rtt_ms: number | null }> = [];
    for (let i = 0; i < 30; i++) {
      const d = ok(await cli(['discover', '--directory', urls.dir, '--base', baseId], env), 'discover');
      found = d.cloudlets as typeof found;
      if (found.length === 2) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.deepEqual(
      found.map((c) => [c.name, c.has_base]),
      [
        ['cloudlet-a', true],
        ['cloudlet-b', false],
      ],
    );
    assert.ok(
      found.every((c) => typeof c.rtt_ms === 'number'),
      'round trips measured',
    );
    const chosen = found[0]!.url;
    assert.equal(chosen, urls.a);

    // Synthesize there: upload with the cloudlet choosing the host port; the answer carries the first response.
    const synth = ok(
      await cli(
        [
          'remote',
          'synthesize',
          overlay,
          '--cloudlet',
          chosen,
          '--base',
          baseId,
          '--guest-port',
          '8080',
          '--wait-path',
          '/cgi-bin/status',
        ],
        env,
      ),
      'remote synthesize',
    );
    const first = parseStatus((synth.answer as { body: string }).body);
    assert.equal(first.token, baseToken, 'memory came back (boot token), not a reboot');
    assert.equal(first.marker, 'svc-marker');
    assert.equal(synth.launcher, 'libvirt');
    const endpoint = (synth.endpoints as Array<{ url: string }>)[0]!.url;
    const viaForward = parseStatus(await (await fetch(`${endpoint}cgi-bin/status`)).text());
    assert.equal(viaForward.token, baseToken, 'the returned forward reaches the guest');
    const domain = String(synth.domain);
    const list = await sh('virsh', ['-c', 'qemu:///system', 'list', '--name']);
    assert.ok(list.out.split('\n').includes(domain), `virsh list shows ${domain}:\n${list.out}`);
    const info = await sh('virsh', ['-c', 'qemu:///system', 'dominfo', domain]);
    assert.match(info.out, /State:\s+running/);
    t.diagnostic(`synthesize on A: ${JSON.stringify(synth.timings_ms)}`);

    // B gets the base by upload; then the instance moves from A to B.
    const imported = ok(await cli(['remote', 'info', '--cloudlet', urls.b], env), 'info b');
    assert.equal((imported.bases as unknown[]).length, 0);
    const up = await fetch(`${urls.b}/v1/bases`, {
      method: 'POST',
      headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
      body: (await import('node:fs')).createReadStream(pkg) as never,
      duplex: 'half',
    });
    assert.equal(up.status, 201, await up.clone().text());
    assert.equal(((await up.json()) as { id: string }).id, baseId);

    const h = ok(
      await cli(['handoff', String(synth.instance), '--to', urls.b, '--wait-path', '/cgi-bin/status'], {
        ...env,
        CLOUDLET_LIBRARY: join(work, 'libA'),
      }),
      'handoff',
    );
    const target = h.target as { answer: { body: string }; domain: string; endpoints: Array<{ url: string }> };
    const after = parseStatus(target.answer.body);
    assert.equal(after.token, baseToken, "the guest's RAM token survived the handoff");
    assert.ok(after.counter > viaForward.counter, 'the in-RAM counter continues on the target');
    assert.equal(after.marker, 'svc-marker', 'the disk came along');
    t.diagnostic(
      `handoff: downtime ${String(h.downtime_ms)} ms, overlay ${String(h.overlay_bytes)} bytes, ${JSON.stringify(h.timings_ms)}`,
    );
    const list2 = (await sh('virsh', ['-c', 'qemu:///system', 'list', '--name'])).out.split('\n');
    assert.ok(list2.includes(target.domain), 'the target instance is a libvirt domain');
    assert.ok(!list2.includes(domain), 'the source was stopped after the target answered');
    const psA = ok(await cli(['remote', 'ps', '--cloudlet', urls.a], env), 'ps a');
    assert.equal((psA.instances as unknown[]).length, 0);
    ok(await cli(['remote', 'stop', String(h.instance), '--cloudlet', urls.b], env), 'stop on b');
  },
);

test(
  'attacks: tokens, a 10 GiB upload, path traversal, 20 concurrent syntheses',
  { skip, timeout: 180_000 },
  async () => {
    const a = urls.a;
    assert.equal((await raw(a, 'GET', '/v1/health')).status, 200, 'health needs no token');
    const none = await raw(a, 'GET', '/v1/instances');
    assert.equal(none.status, 401);
    assert.match(String(none.headers['www-authenticate']), /^Bearer/);
    assert.equal((JSON.parse(none.body) as { code: string }).code, 'UnauthorizedError');
    assert.equal((await raw(a, 'GET', '/v1/instances', { token: `${token}x` })).status, 401, 'wrong token');
    assert.equal((await raw(a, 'GET', '/v1/openapi.json')).status, 401);

    // 10 GiB announced: refused before a byte is read, nothing on disk. A client that waits for
    // 100 Continue (as `remote` does) gets the 413 and sends nothing.
    const t0 = performance.now();
    const upload = {
      token,
      contentType: 'application/octet-stream',
      contentLength: 10 * 2 ** 30,
      chunk: Buffer.alloc(1 << 20),
    };
    const big = await raw(a, 'POST', `/v1/instances?base=${baseId}&guest_port=8080`, { ...upload, expect: true });
    assert.equal(big.status, 413, big.body);
    assert.ok(performance.now() - t0 < 5000, 'refused at once');
    assert.equal(big.sent, 0, 'nothing sent before the refusal');
    // One that sends at once is cut off early: the 413, or a reset when the close wins the race.
    const t1 = performance.now();
    const eager = await raw(a, 'POST', `/v1/instances?base=${baseId}&guest_port=8080`, upload).catch(
      (err: NodeJS.ErrnoException) => {
        assert.ok(['EPIPE', 'ECONNRESET'].includes(err.code ?? ''), String(err));
        return { status: 413, sent: 0, body: '', headers: {} };
      },
    );
    assert.equal(eager.status, 413, eager.body);
    assert.ok(performance.now() - t1 < 5000, 'refused at once');
    assert.ok(eager.sent < 256 << 20, `stopped early (sent ${eager.sent} bytes)`);
    const libA = join(work, 'libA');
    assert.deepEqual(await readdir(join(libA, 'instances')).catch(() => []), [], 'no instance directory left');
    assert.deepEqual(
      (await readdir(join(libA, 'tmp')).catch(() => [])).filter((n) => !n.startsWith('.')),
      [],
      'nothing in tmp',
    );

    // Path traversal in every field: refused by pattern (400), nothing touched.
    const bad: Array<[string, string, unknown?]> = [
      ['GET', '/v1/bases/..%2F..%2F..%2Fetc%2Fpasswd'],
      ['GET', '/v1/bases/..'],
      ['GET', '/v1/instances/..%2F..%2Fbases'],
      ['DELETE', '/v1/instances/i-..%2F..'],
      ['GET', '/v1/instances/..%2Fx/logs'],
      ['GET', `/v1/instances/i-abc/logs?source=..%2F..%2Fetc%2Fshadow`],
      ['POST', '/v1/instances', { base: '../../etc', overlay_url: 'http://127.0.0.1:1/x', guest_ports: [8080] }],
      ['POST', '/v1/instances', { base: baseId, overlay_url: 'file:///etc/passwd', guest_ports: [8080] }],
      ['POST', '/v1/instances', { base: baseId, overlay_url: '/etc/passwd', guest_ports: [8080] }],
      [
        'POST',
        '/v1/instances',
        { base: baseId, overlay_url: 'http://x/y', guest_ports: [8080], wait_path: '/../../etc' },
      ],
      ['POST', '/v1/instances', { base: baseId, overlay_url: 'http://x/y', guest_ports: [8080], name: '../../x' }],
      ['POST', '/v1/instances', { base: baseId, overlay_url: 'http://x/y', guest_ports: [0] }],
      ['POST', '/v1/bases', { url: 'file:///etc/passwd' }],
    ];
    for (const [method, path, json] of bad) {
      const r = await raw(a, method, path, { token, json });
      assert.equal(r.status, 400, `${method} ${path} ${JSON.stringify(json)} → ${r.status} ${r.body}`);
      assert.equal((JSON.parse(r.body) as { message_type: string }).message_type, 'error');
    }
    const up = await raw(a, 'POST', `/v1/instances?base=..%2F..%2Fetc&guest_port=8080`, {
      token,
      contentType: 'application/octet-stream',
      contentLength: 3,
      chunk: Buffer.from('abc'),
    });
    assert.equal(up.status, 400, up.body);
    const dirBad = await raw(urls.dir, 'PUT', '/v1/directory/cloudlets/..%2F..%2Fetc', {
      token,
      json: { name: 'x', url: 'http://x', bases: [] },
    });
    assert.equal(dirBad.status, 400);

    // 20 syntheses at once against --max-syntheses 2: all answered, the rest 429, no port twice.
    const { readFile } = await import('node:fs/promises');
    const body = await readFile(overlay);
    const answers = await Promise.all(
      Array.from({ length: 20 }, () =>
        fetch(`${a}/v1/instances?base=${baseId}&guest_port=8080&wait_path=/cgi-bin/status`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}`, 'content-type': 'application/octet-stream' },
          body,
        }).then(async (r) => ({
          status: r.status,
          retry: r.headers.get('retry-after'),
          json: (await r.json()) as Record<string, unknown>,
        })),
      ),
    );
    const okOnes = answers.filter((r) => r.status === 201);
    const busy = answers.filter((r) => r.status === 429);
    assert.equal(
      okOnes.length + busy.length,
      20,
      `every request answered 201 or 429: ${answers.map((r) => r.status).join(' ')}`,
    );
    assert.ok(okOnes.length >= 1 && okOnes.length <= 2, `${okOnes.length} ran (limit 2)`);
    for (const b of busy) {
      assert.equal(b.json.code, 'BusyError');
      assert.ok(Number(b.retry) > 0, 'Retry-After');
    }
    const hostPorts = okOnes.map((r) => (r.json.forwards as Array<{ hostPort: number }>)[0]!.hostPort);
    assert.equal(new Set(hostPorts).size, hostPorts.length, `no port collisions: ${hostPorts.join(' ')}`);
    for (const r of okOnes) assert.equal(parseStatus((r.json.answer as { body: string }).body).token, baseToken);
    const ps = (await (await fetch(`${a}/v1/instances`, { headers: { authorization: `Bearer ${token}` } })).json()) as {
      instances: Array<{ id: string; status: string }>;
    };
    assert.deepEqual(
      ps.instances.map((i) => i.id).sort(),
      okOnes.map((r) => String(r.json.instance)).sort(),
      'nothing lost, nothing extra',
    );
    for (const i of ps.instances)
      assert.equal((await raw(a, 'DELETE', `/v1/instances/${i.id}`, { token })).status, 200);
  },
);
