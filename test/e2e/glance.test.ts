/**
 * OpenStack++ against a real Glance: scripts/glance.sh starts Debian's glance-api (no keystone,
 * sqlite, file store, sha256 hashes) on a free 127.0.0.1 port with its own data directory. A
 * base captured from the demo VM is pushed, pulled into an empty library on the "other side"
 * and verified; an overlay is pushed and `synthesize glance://ID` resumes the guest there with
 * its RAM token. A missing image, a wrong base, a damaged image and a Glance that is down each
 * give one clear line and their exit code, with nothing left behind. CI must run this (CI=1:
 * fail, not skip, when glance-api or QEMU is missing or does not start).
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, open, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ensureDemoVm, freePort, parseStatus, repoRoot, captureDemoBase } from '../helpers/demo-vm.js';
import { BIN, cli, ok, stopAllInstances } from '../helpers/cli.js';
import { findQemu } from '../helpers/tiny-qemu.js';
import { xorByte } from '../helpers/bytes.js';

const hasQemu = findQemu() !== null;
const hasGlance = existsSync('/usr/bin/glance-api');
if (process.env.CI && !hasQemu) throw new Error('QEMU is required in CI (apt-get install qemu-system-x86 qemu-utils)');
if (process.env.CI && !hasGlance) throw new Error('glance-api is required in CI (bash scripts/glance.sh install)');
const skip = !hasQemu || !hasGlance;
if (skip)
  console.error(`\n*** ${hasQemu ? 'glance-api' : 'QEMU'} not found: skipping the Glance end-to-end test ***\n`);

const GLANCE_SH = join(repoRoot(), 'scripts', 'glance.sh');

let work: string;
let glanceDir: string;
let glance = '';
/** Library A (where the base is made) and B (the cloudlet: starts empty, gets everything from Glance). */
let envA: NodeJS.ProcessEnv;
let envB: NodeJS.ProcessEnv;
let baseId = '';
let baseImage = '';
let overlayImage = '';
let baseToken = '';
const marker = `glance-${Date.now().toString(36)}`;

function glanceSh(args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile('bash', [GLANCE_SH, ...args], { timeout: 90_000 }, (err, stdout, stderr) => {
      if (err) reject(new Error(`glance.sh ${args[0]} failed: ${err.message}\n${stderr}`));
      else resolve(stdout.trim());
    });
  });
}

async function image(id: string): Promise<Record<string, unknown>> {
  const res = await fetch(`${glance}/v2/images/${id}`);
  assert.equal(res.status, 200, `GET image ${id}`);
  return (await res.json()) as Record<string, unknown>;
}

async function allImageIds(): Promise<string[]> {
  const res = await fetch(`${glance}/v2/images?limit=1000`);
  return ((await res.json()) as { images: Array<{ id: string }> }).images.map((i) => i.id).sort();
}

/** Nothing half-done in a library: no temporary files, no instance directories. */
async function assertClean(lib: string, what: string): Promise<void> {
  assert.deepEqual(await readdir(join(lib, 'tmp')).catch(() => []), [], `${what}: nothing left in ${lib}/tmp`);
  assert.deepEqual(await readdir(join(lib, 'instances')).catch(() => []), [], `${what}: no instance left`);
}

before(async () => {
  if (skip) return;
  work = await mkdtemp(join(tmpdir(), 'clo-glance-'));
  glanceDir = join(work, 'glance');
  const clean = { ...process.env };
  for (const k of Object.keys(clean)) if (k.startsWith('OS_') || k === 'CLOUDLET_GLANCE_URL') delete clean[k];
  const [endpoint] = await Promise.all([
    freePort().then((port) => glanceSh(['start', '--dir', glanceDir, '--port', String(port)])),
    ensureDemoVm(),
  ]);
  glance = endpoint;
  envA = { ...clean, CLOUDLET_LIBRARY: join(work, 'lib-a'), CLOUDLET_GLANCE_URL: glance };
  envB = { ...clean, CLOUDLET_LIBRARY: join(work, 'lib-b'), CLOUDLET_GLANCE_URL: glance };
});

after(async () => {
  if (skip || !work) return;
  for (const env of [envA, envB]) {
    if (env) await stopAllInstances(env);
  }
  await glanceSh(['stop', '--dir', glanceDir]).catch(() => undefined);
  await rm(work, { recursive: true, force: true });
});

test(
  'a base and an overlay through Glance: push, pull into an empty library, synthesize glance://ID',
  { skip, timeout: 240_000 },
  async (t) => {
    const t0 = performance.now();
    // 1. The base and an overlay, made in library A (as in synthesis.test.ts).
    const captured = await captureDemoBase(envA, join(work, 'boot'));
    baseToken = captured.status.token;
    baseId = captured.id;
    const port0 = await freePort();
    const iid = String(
      ok(await cli(['launch', 'demo', '--customize', '--forward', `${port0}:8080`], envA), 'launch').instance,
    );
    const script = [
      `echo ${marker} > /mnt/marker`,
      'seq 1 50000 > /mnt/numbers.txt',
      '(setsid sh -c \'n=0; while :; do n=$((n+1)); echo "demo-app ticks=$n" > /tmp/app-state; sleep 1; done\' ' +
        '</dev/null >/dev/null 2>&1 &)',
      'sync',
    ].join(' && ');
    ok(await cli(['console', iid, '--run', script], envA), 'console --run');
    const snap = join(work, 'custom');
    ok(await cli(['snapshot', '--instance', iid, '-o', snap, '--then', 'quit'], envA), 'snapshot');
    ok(await cli(['stop', iid], envA), 'stop');
    const overlay = join(work, 'app.overlay');
    ok(
      await cli(
        [
          'create',
          '--base',
          'demo',
          '--disk',
          join(snap, 'disk.qcow2'),
          '--memory',
          join(snap, 'memory.stream'),
          '-o',
          overlay,
        ],
        envA,
      ),
      'create',
    );
    t.diagnostic(`base + overlay made in ${Math.round(performance.now() - t0)} ms`);

    // 2. base push: one image, typed and tied to the base id, checked against Glance's sha256.
    const t1 = performance.now();
    const pushed = ok(await cli(['base', 'push', 'demo', '--glance', glance], envA), 'base push');
    assert.equal(pushed.message_type, 'base_push');
    assert.equal(pushed.added, true);
    assert.equal(pushed.id, baseId);
    baseImage = String(pushed.image_id);
    assert.equal(pushed.url, `glance://${baseImage}`);
    const bi = await image(baseImage);
    assert.equal(bi.status, 'active');
    assert.equal(bi.cloudlet_type, 'base_package');
    assert.equal(bi.cloudlet_base_id, baseId);
    assert.equal(bi.cloudlet_base_name, 'demo');
    assert.equal(bi.cloudlet_machine, 'pc-q35-7.2');
    assert.equal(bi.os_hash_algo, 'sha256');
    assert.equal(bi.os_hash_value, pushed.sha256, "Glance's sha256 is the one we sent");
    assert.equal(bi.cloudlet_sha256, pushed.sha256);
    assert.equal(bi.cloudlet_upload, undefined, 'the in-progress tag is gone once the upload is checked');
    assert.equal(typeof pushed.size, 'number');
    assert.equal(bi.size, pushed.size);
    t.diagnostic(`base push: ${Number(pushed.size)} bytes in ${Math.round(performance.now() - t1)} ms`);
    const again = ok(await cli(['base', 'push', 'demo'], envA), 'base push again');
    assert.equal(again.added, false, 'a second push uploads nothing');
    assert.equal(again.image_id, baseImage);
    const listed = ok(await cli(['base', 'list', '--glance'], envA), 'base list --glance') as {
      bases: Array<{ id: string; image_id: string; name: string }>;
    };
    assert.deepEqual(
      listed.bases.map((b) => [b.id, b.image_id, b.name]),
      [[baseId, baseImage, 'demo']],
    );
    const local = ok(await cli(['base', 'list'], envA), 'base list') as { bases: Array<{ id: string }> };
    assert.deepEqual(
      local.bases.map((b) => b.id),
      [baseId],
      'without --glance: the library',
    );

    // 3. base pull into the empty library B, verified; a second pull downloads nothing.
    const t2 = performance.now();
    const pulled = ok(await cli(['base', 'pull', 'demo'], envB), 'base pull');
    assert.deepEqual([pulled.id, pulled.image_id, pulled.added], [baseId, baseImage, true]);
    t.diagnostic(`base pull: ${Math.round(performance.now() - t2)} ms`);
    ok(await cli(['base', 'verify', 'demo'], envB), 'base verify in B');
    const showA = ok(await cli(['base', 'show', 'demo'], envA), 'show A');
    const showB = ok(await cli(['base', 'show', 'demo'], envB), 'show B');
    assert.deepEqual(showB.targets, showA.targets, 'the same targets and digests');
    assert.deepEqual(showB.vm, showA.vm, 'the same VM spec');
    assert.equal(ok(await cli(['base', 'pull', `glance://${baseImage}`], envB), 'pull again').added, false);
    await assertClean(join(work, 'lib-b'), 'base pull');

    // 4. overlay push: its answer carries the image id; typed and tied to the base.
    const op = ok(await cli(['overlay', 'push', overlay], envA), 'overlay push');
    overlayImage = String(op.image_id);
    assert.match(overlayImage, /^[0-9a-f-]{36}$/);
    assert.equal(op.base_id, baseId);
    const oi = await image(overlayImage);
    assert.deepEqual(
      [oi.status, oi.cloudlet_type, oi.cloudlet_base_id, oi.name],
      ['active', 'overlay', baseId, 'app.overlay'],
    );
    assert.equal(oi.os_hash_value, op.sha256);
    assert.equal(oi.size, (await readFile(overlay)).length);
    const byBase = ok(await cli(['overlay', 'list', '--base', 'demo'], envA), 'overlay list') as {
      overlays: Array<{ image_id: string }>;
    };
    assert.deepEqual(
      byBase.overlays.map((o) => o.image_id),
      [overlayImage],
    );
    const otherBase = ok(await cli(['overlay', 'list', '--base', 'f'.repeat(64)], envA), 'overlay list other') as {
      overlays: unknown[];
    };
    assert.deepEqual(otherBase.overlays, [], 'listing by base filters on cloudlet_base_id');
    // Random access for a streaming reader: a ranged GET of the footer answers 206 with its bytes.
    const tail = await fetch(`${glance}/v2/images/${overlayImage}/file`, { headers: { range: 'bytes=-64' } });
    assert.equal(tail.status, 206);
    assert.deepEqual(Buffer.from(await tail.arrayBuffer()), (await readFile(overlay)).subarray(-64));

    // 5. synthesize glance://ID in library B: the customized guest resumes with the base's RAM token.
    const port = await freePort();
    const syn = ok(
      await cli(
        [
          'synthesize',
          `glance://${overlayImage}`,
          '--base',
          'demo',
          '--forward',
          `${port}:8080`,
          '--wait-http',
          `http://127.0.0.1:${port}/cgi-bin/status`,
          '--detach',
        ],
        envB,
      ),
      'synthesize glance://',
    );
    const s = parseStatus((syn.answer as { body: string }).body);
    assert.equal(s.token, baseToken, 'memory came back (boot token), not a reboot');
    assert.equal(s.marker, marker, 'the customized disk came back');
    assert.match(s.app, /^demo-app ticks=\d+/, 'the process started in the guest still runs');
    const timings = syn.timings_ms as Record<string, number>;
    assert.ok('resolve' in timings && 'rebuild' in timings, 'resolved, then streamed into the pipeline');
    t.diagnostic(`synthesize glance:// timings ${JSON.stringify(timings)}`);
    ok(await cli(['stop', String(syn.instance)], envB), 'stop');
    await assertClean(join(work, 'lib-b'), 'synthesize');
  },
);

test('Glance failures: one line, a distinct exit code, nothing left behind', { skip, timeout: 120_000 }, async () => {
  assert.ok(overlayImage && baseImage, 'the first test pushed a base and an overlay');
  const libB = join(work, 'lib-b');
  const expectFail = async (
    args: string[],
    code: number,
    pattern: RegExp,
    env: NodeJS.ProcessEnv = envB,
  ): Promise<void> => {
    const r = await cli(args, env);
    assert.equal(r.code, code, `${args.join(' ')} → ${r.code}: ${r.stderr}`);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr, got: ${r.stderr}`);
    assert.match(r.stderr, pattern);
    assert.equal(r.json.exit_code, code);
    await assertClean(String(env.CLOUDLET_LIBRARY), args.join(' '));
  };
  const port = await freePort();
  const syn = (ref: string, base = 'demo'): string[] => [
    'synthesize',
    ref,
    '--base',
    base,
    '--forward',
    `${port}:8080`,
    '--detach',
  ];

  // A missing image, and something that is not an image reference.
  await expectFail(syn('glance://0b9f2f8e-5a55-4f0e-9c1d-3f2a6b7c8d9e'), 3, /no image 0b9f2f8e-.* in Glance/);
  await expectFail(syn('glance://no-such-thing'), 2, /not a Glance image reference/);
  // The wrong kind of image.
  await expectFail(syn(`glance://${baseImage}`), 2, /is a cloudlet base_package, not an overlay/);
  await expectFail(['base', 'pull', overlayImage], 2, /is a cloudlet overlay, not a base package/);
  await expectFail(['base', 'pull', 'nosuchbase'], 3, /no base nosuchbase in Glance/);
  // A wrong base: refused on the image's properties, before anything is downloaded.
  ok(await cli(['base', 'import', join(work, 'custom'), '--name', 'other'], envB), 'import another base');
  await expectFail(syn(`glance://${overlayImage}`, 'other'), 5, /is an overlay for base [0-9a-f]{12}, not for base/);
  // An interrupted push (SIGINT once its image exists, mid-upload) deletes that image: exit 130.
  const withOther = async (): Promise<Array<{ id: string; status: string }>> => {
    const res = await fetch(`${glance}/v2/images?cloudlet_base_name=other`);
    return ((await res.json()) as { images: Array<{ id: string; status: string }> }).images;
  };
  const pushing = spawn(process.execPath, [BIN, '--json', 'base', 'push', 'other'], { env: envB, stdio: 'ignore' });
  const exited = new Promise<number | null>((r) => pushing.once('exit', (code) => r(code)));
  let seen: Array<{ id: string; status: string }> = [];
  for (const deadline = Date.now() + 30_000; seen.length === 0 && Date.now() < deadline;) {
    seen = await withOther();
    if (seen.length === 0) await new Promise((r) => setTimeout(r, 10));
  }
  pushing.kill('SIGINT');
  assert.equal(seen.length, 1, 'the push created its image');
  assert.notEqual(seen[0]!.status, 'active', 'interrupted before the upload finished');
  assert.equal(await exited, 130, 'an interrupted push exits 130');
  assert.deepEqual(await withOther(), [], 'the interrupted upload left no image in Glance');
  await assertClean(libB, 'interrupted push');

  // Not an overlay: refused before anything is created in Glance.
  const before = await allImageIds();
  await writeFile(join(work, 'not.overlay'), 'this is not an overlay\n'.repeat(100));
  await expectFail(['overlay', 'push', join(work, 'not.overlay')], 4, /overlay|magic|truncated/);
  assert.deepEqual(await allImageIds(), before, 'no image created for a refused push');

  // A damaged base package in Glance's store: the pull is refused and the library stays empty.
  const stored = join(glanceDir, 'images', baseImage);
  const fh = await open(stored, 'r+');
  const size = (await fh.stat()).size;
  const one = Buffer.alloc(1);
  await fh.read(one, 0, 1, Math.floor(size / 2));
  xorByte(one, 0, 0x20);
  await fh.write(one, 0, 1, Math.floor(size / 2));
  await fh.close();
  const envC = { ...envB, CLOUDLET_LIBRARY: join(work, 'lib-c') };
  await expectFail(['base', 'pull', 'demo'], 4, /does not match its sha256/, envC);
  assert.deepEqual(await readdir(join(work, 'lib-c', 'bases')).catch(() => []), [], 'no base in library C');

  // No endpoint at all.
  const noGlance = { ...envB };
  delete noGlance.CLOUDLET_GLANCE_URL;
  await expectFail(['overlay', 'list'], 2, /no Glance endpoint/, noGlance);

  // A Glance that is down: every command says so with exit 12.
  await glanceSh(['stop', '--dir', glanceDir]);
  await expectFail(
    syn(`glance://${overlayImage}`),
    12,
    /Glance at http:\/\/127\.0\.0\.1:\d+ is not reachable: ECONNREFUSED/,
  );
  await expectFail(['base', 'pull', 'demo'], 12, /not reachable/, envC);
  await expectFail(['base', 'push', 'demo'], 12, /not reachable/);
  await expectFail(['overlay', 'push', join(work, 'app.overlay')], 12, /not reachable/);
  await expectFail(['base', 'list', '--glance'], 12, /not reachable/);
  await assertClean(libB, 'after the failures');
});
