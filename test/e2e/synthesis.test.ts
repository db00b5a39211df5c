/**
 * The product end to end on real QEMU (TCG): boot the demo base VM, capture it into a library,
 * launch it with a fresh disk layer, customize the guest (disk and memory), snapshot, create
 * the overlay, synthesize it — twice at once on different ports —, survive a kill -9, and check
 * every failure path: one clear line, a distinct exit code, no QEMU and no output left behind.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, writeFile, mkdir, stat, symlink } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { createServer as createHttpServer } from 'node:http';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { ensureDemoVm, freePort, parseStatus, captureDemoBase } from '../helpers/demo-vm.js';
import { BIN, cli, cliChild, ok, stopAllInstances } from '../helpers/cli.js';
import { startGateServer, type GateOptions, type GateServer } from '../helpers/gate-server.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { findQemu } from '../helpers/tiny-qemu.js';
import { xorByte } from '../helpers/bytes.js';

const hasQemu = findQemu() !== null;
if (!hasQemu && process.env.CI) throw new Error('QEMU is required in CI (apt-get install qemu-system-x86 qemu-utils)');
if (!hasQemu) console.error('\n*** QEMU not found: skipping the synthesis end-to-end test ***\n');

let work: string;
let env: NodeJS.ProcessEnv;
let baseId = '';
let baseStatus = { token: '', counter: 0 };
const marker = `app-${Date.now().toString(36)}`;

async function sha256(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

async function qemuPids(): Promise<number[]> {
  const pids: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const cmd = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith('qemu-system') && cmd.includes(work)) pids.push(Number(name));
  }
  return pids;
}

before(async () => {
  if (!hasQemu) return;
  work = await mkdtemp(join(tmpdir(), 'clo-e2e-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(work, 'lib') };
  await ensureDemoVm();
});

after(async () => {
  if (!hasQemu) return;
  await stopAllInstances(env);
  await rm(work, { recursive: true, force: true });
});

test(
  'capture a base, customize it, create an overlay, synthesize it',
  { skip: !hasQemu, timeout: 240_000 },
  async (t) => {
    // 1. A freshly booted base VM, captured into the library through its QMP socket.
    const captured = await captureDemoBase(env, join(work, 'boot'));
    baseStatus = captured.status;
    baseId = captured.id;
    const baseDir = join(work, 'lib', 'bases', baseId);
    const ramFile = join(baseDir, 'ram', 'pc.ram.raw');
    const baseDisk = join(baseDir, 'disk.raw');
    const before = { ram: await sha256(ramFile), disk: await sha256(baseDisk) };

    // 2. Launch it with a fresh disk layer and install an "application" through the console.
    const port0 = await freePort();
    const launched = ok(await cli(['launch', 'demo', '--customize', '--forward', `${port0}:8080`], env), 'launch');
    const iid = String(launched.instance);
    const resumed = parseStatus(await (await fetch(`http://127.0.0.1:${port0}/cgi-bin/status`)).text());
    assert.equal(resumed.token, baseStatus.token, 'launch resumed the base memory (same boot token)');
    const script = [
      `echo ${marker} > /mnt/marker`,
      'mkdir -p /mnt/app',
      'seq 1 100000 > /mnt/app/numbers.txt',
      'cp /bin/busybox /mnt/app/busybox.copy',
      '(setsid sh -c \'n=0; while :; do n=$((n+1)); echo "demo-app ticks=$n" > /tmp/app-state; sleep 1; done\' ' +
        '</dev/null >/dev/null 2>&1 &)',
      'sync',
    ].join(' && ');
    ok(await cli(['console', iid, '--run', script], env), 'console --run');
    const snapDir = join(work, 'custom');
    ok(await cli(['snapshot', '--instance', iid, '-o', snapDir, '--then', 'quit'], env), 'snapshot');
    ok(await cli(['stop', iid], env), 'stop launched');

    // 3. The overlay.
    const overlay = join(work, 'app.overlay');
    const created = ok(
      await cli(
        [
          'create',
          '--base',
          'demo',
          '--disk',
          join(snapDir, 'disk.qcow2'),
          '--memory',
          join(snapDir, 'memory.stream'),
          '-o',
          overlay,
        ],
        env,
      ),
      'create',
    );
    t.diagnostic(
      `overlay ${String(created.size)} bytes; encodings ` +
        JSON.stringify((created.stats as { encodings: unknown }).encodings),
    );
    ok(await cli(['verify', overlay], env), 'verify');

    // 4. Two instances of one base at once, on different ports.
    const [p1, p2] = [await freePort(), await freePort()];
    const runs = await Promise.all(
      [p1, p2].map((p) =>
        cli(
          [
            'synthesize',
            overlay,
            '--base',
            'demo',
            '--forward',
            `${p}:8080`,
            '--wait-http',
            `http://127.0.0.1:${p}/cgi-bin/status`,
            '--detach',
          ],
          env,
        ),
      ),
    );
    const ids: string[] = [];
    for (const r of runs) {
      const j = ok(r, 'synthesize');
      ids.push(String(j.instance));
      const s = parseStatus((j.answer as { body: string }).body);
      assert.equal(s.token, baseStatus.token, 'the customized memory came back (boot token), not a reboot');
      assert.equal(s.marker, marker, 'the customized disk came back (marker)');
      assert.match(s.app, /^demo-app ticks=\d+/, 'the process started in the guest is still running');
      assert.ok(s.counter > baseStatus.counter, 'the in-RAM request counter continues');
      const timings = j.timings_ms as Record<string, number>;
      // One pipeline: QEMU starts at once, the overlay is rebuilt into it, then it runs.
      for (const k of ['rebuild', 'qemu_start', 'load_wait', 'first_response', 'total'])
        assert.ok(k in timings, `timing ${k}`);
      t.diagnostic(`synthesize timings ${JSON.stringify(timings)}`);
    }
    for (const p of [p1, p2]) {
      const s = parseStatus(await (await fetch(`http://127.0.0.1:${p}/cgi-bin/status`)).text());
      assert.equal(s.marker, marker);
    }

    // 5. kill -9 one QEMU: ps reports it dead; synthesize still works.
    const ps1 = ok(await cli(['ps'], env), 'ps') as { instances: Array<{ id: string; pid: number; status: string }> };
    const victim = ps1.instances.find((i) => i.id === ids[0])!;
    process.kill(victim.pid, 'SIGKILL');
    await new Promise((r) => setTimeout(r, 300));
    const ps2 = ok(await cli(['ps'], env), 'ps') as { instances: Array<{ id: string; status: string }> };
    assert.equal(ps2.instances.find((i) => i.id === ids[0])?.status, 'dead');
    assert.equal(ps2.instances.find((i) => i.id === ids[1])?.status, 'running');
    const p3 = await freePort();
    const again = ok(
      await cli(
        [
          'synthesize',
          overlay,
          '--base',
          'demo',
          '--forward',
          `${p3}:8080`,
          '--wait-http',
          `http://127.0.0.1:${p3}/cgi-bin/status`,
          '--detach',
        ],
        env,
      ),
      'synthesize after kill',
    );
    ids.push(String(again.instance));
    assert.equal(parseStatus((again.answer as { body: string }).body).marker, marker);
    // From a URL: streamed into the pipeline. The server drops the first connection halfway
    // (the rest is asked for again with a Range request); /short.overlay always ends early.
    let dropped = false;
    const web = createHttpServer((req, res) => {
      const etag = '"app-v1"';
      const len = good.length;
      if (req.url === '/app.overlay') {
        const m = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
        if (m && req.headers['if-range'] === etag) {
          const start = Number(m[1]);
          res.writeHead(206, {
            'content-range': `bytes ${start}-${len - 1}/${len}`,
            'content-length': String(len - start),
            etag,
          });
          res.end(good.subarray(start));
          return;
        }
        res.writeHead(200, { 'content-length': String(len), etag });
        if (dropped) {
          res.end(good);
          return;
        }
        dropped = true;
        res.write(good.subarray(0, Math.floor(len / 2)), () => res.destroy());
        return;
      }
      if (req.url === '/short.overlay') {
        res.writeHead(200, { 'content-length': String(len) });
        res.write(good.subarray(0, len - 4096), () => res.destroy());
        return;
      }
      res.writeHead(404).end();
    });
    const good = await readFile(overlay);
    await new Promise<void>((r) => web.listen(0, '127.0.0.1', r));
    try {
      const wport = (web.address() as { port: number }).port;
      const p4 = await freePort();
      const fromUrl = ok(
        await cli(
          [
            'synthesize',
            `http://127.0.0.1:${wport}/app.overlay`,
            '--base',
            'demo',
            '--forward',
            `${p4}:8080`,
            '--wait-http',
            `http://127.0.0.1:${p4}/cgi-bin/status`,
            '--detach',
          ],
          env,
        ),
        'synthesize from URL',
      );
      ids.push(String(fromUrl.instance));
      assert.equal(parseStatus((fromUrl.answer as { body: string }).body).marker, marker);
      // Streamed from the URL into the pipeline: no separate download phase; the drop was resumed.
      assert.ok('rebuild' in (fromUrl.timings_ms as object) && !('fetch' in (fromUrl.timings_ms as object)));
      assert.deepEqual(fromUrl.download, { bytes: good.length, resumed: 1 }, 'resumed after the dropped connection');
      const instancesBefore = await readdir(join(work, 'lib', 'instances'));
      const short = await cli(
        ['synthesize', `http://127.0.0.1:${wport}/short.overlay`, '--base', 'demo', '--detach'],
        env,
      );
      assert.equal(short.code, 12, `a body that always ends early is refused: ${short.stderr}`);
      assert.match(short.stderr, /broke off/);
      assert.deepEqual(await readdir(join(work, 'lib', 'instances')), instancesBefore, 'no instance left');
      const missing = await cli(
        ['synthesize', `http://127.0.0.1:${wport}/nothere.overlay`, '--base', 'demo', '--detach'],
        env,
      );
      assert.equal(missing.code, 3, missing.stderr);
    } finally {
      web.close();
    }
    const refused = await cli(
      ['synthesize', `http://127.0.0.1:${await freePort()}/app.overlay`, '--base', 'demo', '--detach'],
      env,
    );
    assert.equal(refused.code, 12, refused.stderr);
    assert.deepEqual(
      (await readdir(join(work, 'lib', 'tmp')).catch(() => [])).filter((n) => n.startsWith('download-')),
      [],
      'no download left behind',
    );

    // 6. In the foreground (no --detach): the result once the VM answers, then Ctrl-C stops the
    // VM, removes its instance directory, and exits 0.
    const p5 = await freePort();
    const url5 = `http://127.0.0.1:${p5}/cgi-bin/status`;
    const fg = spawn(
      process.execPath,
      [BIN, '--json', 'synthesize', overlay, '--base', 'demo', '--forward', `${p5}:8080`, '--wait-http', url5],
      { env, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let fgOut = '';
    let fgErr = '';
    fg.stderr.on('data', (d: Buffer) => (fgErr += d.toString()));
    const fgExit = once(fg, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
    const line = await new Promise<string>((resolve, reject) => {
      fg.stdout.on('data', (d: Buffer) => {
        fgOut += d.toString();
        const nl = fgOut.indexOf('\n');
        if (nl >= 0) resolve(fgOut.slice(0, nl));
      });
      void fgExit.then(([code]) => reject(new Error(`foreground synthesize ended (${code}) early: ${fgErr}`)));
    });
    const fgResult = JSON.parse(line) as { instance: string; pid: number; dir: string };
    assert.equal(parseStatus(await (await fetch(url5)).text()).marker, marker, 'the foreground VM answers');
    fg.kill('SIGINT');
    const [fgCode] = await fgExit;
    assert.equal(fgCode, 0, `Ctrl-C ends a foreground synthesize normally: ${fgErr}`);
    assert.equal(await stat(fgResult.dir).catch(() => undefined), undefined, 'its instance directory is removed');
    assert.ok(!(await qemuPids()).includes(fgResult.pid), 'its QEMU is stopped');

    const logs = await cli(['logs', ids[1]!], env);
    assert.equal(logs.code, 0);
    // base rm is refused while instances use the base
    const rmBusy = await cli(['base', 'rm', 'demo'], env);
    assert.equal(rmBusy.code, 10, rmBusy.stderr);
    for (const id of ids) ok(await cli(['stop', id], env), `stop ${id}`);
    assert.deepEqual(await qemuPids(), [], 'no QEMU left running');

    // 6. The base never changes.
    assert.equal(await sha256(ramFile), before.ram, 'base RAM file unchanged');
    assert.equal(await sha256(baseDisk), before.disk, 'base disk unchanged');
    const v = await cli(['base', 'verify', 'demo'], env);
    assert.equal(v.code, 0, v.stderr);
  },
);

test(
  'failures: one line, a distinct exit code, no QEMU and no instance left',
  { skip: !hasQemu, timeout: 120_000 },
  async () => {
    assert.ok(baseId, 'the first test made a base');
    const overlay = join(work, 'app.overlay');
    const good = await readFile(overlay);
    const instancesBefore = await readdir(join(work, 'lib', 'instances')).catch(() => []);
    const port = await freePort();
    const expectFail = async (
      args: string[],
      code: number,
      pattern: RegExp,
      e: NodeJS.ProcessEnv = env,
    ): Promise<void> => {
      const r = await cli(args, e);
      assert.equal(r.code, code, `${args.join(' ')} → ${r.code}: ${r.stderr}`);
      assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr, got: ${r.stderr}`);
      assert.match(r.stderr, pattern);
      assert.equal(r.json.exit_code, code);
      assert.deepEqual(await qemuPids(), [], 'no QEMU left running');
      assert.deepEqual(
        await readdir(join(work, 'lib', 'instances')).catch(() => []),
        instancesBefore,
        'no instance left',
      );
    };
    const syn = (o: string, extra: string[] = []): string[] => [
      'synthesize',
      o,
      '--base',
      'demo',
      '--forward',
      `${port}:8080`,
      '--wait-http',
      `http://127.0.0.1:${port}/`,
      '--detach',
      ...extra,
    ];

    // A corrupt overlay (one flipped bit in the body).
    const bad = Buffer.from(good);
    xorByte(bad, Math.floor(bad.length / 2), 0x10);
    await writeFile(join(work, 'corrupt.overlay'), bad);
    await expectFail(syn(join(work, 'corrupt.overlay')), 4, /checksum|damaged/);
    // A truncated one.
    await writeFile(join(work, 'short.overlay'), good.subarray(0, good.length >> 1));
    await expectFail(syn(join(work, 'short.overlay')), 4, /truncated/);
    // An overlay for another base: import the customized snapshot as a second base.
    const second = ok(
      await cli(['base', 'import', join(work, 'custom'), '--name', 'other'], env),
      'import second base',
    );
    await expectFail(
      ['synthesize', overlay, '--base', 'other', '--forward', `${port}:8080`, '--detach'],
      5,
      /made for base/,
    );
    ok(await cli(['base', 'rm', String(second.id)], env), 'rm second base');
    // A base that does not exist.
    await expectFail(['synthesize', overlay, '--base', 'f00d', '--detach'], 3, /no base f00d/);
    // A port already in use.
    const server: Server = createServer();
    await new Promise<void>((r) => server.listen(port, '127.0.0.1', r));
    try {
      await expectFail(syn(overlay), 10, /port .*in use|already in use/);
    } finally {
      server.close();
    }
    // A resume QEMU refuses: a base whose VM spec names another machine type. QEMU's message and
    // the likely cause, exit 8, nothing left running.
    const wrong = join(work, 'wrong-machine');
    await mkdir(wrong);
    for (const f of await readdir(join(work, 'custom'))) await symlink(join(work, 'custom', f), join(wrong, f));
    const vmFile = JSON.parse(await readFile(join(work, 'custom', 'vm.json'), 'utf8')) as { vm: { machine: string } };
    vmFile.vm.machine = 'pc-q35-7.1';
    await rm(join(wrong, 'vm.json'));
    await writeFile(join(wrong, 'vm.json'), JSON.stringify(vmFile));
    const env2 = { ...env, CLOUDLET_LIBRARY: join(work, 'lib-wrong') };
    const refusedImport = await cli(['base', 'import', wrong], env2);
    assert.equal(refusedImport.code, 2, 'import refuses a spec that does not match the snapshot');
    assert.match(refusedImport.stderr, /machine pc-q35-7\.1 but the memory snapshot is from pc-q35-7\.2/);
    // Devices cannot be checked at import: another NIC model passes, and QEMU refuses the resume.
    const vmNic = JSON.parse(await readFile(join(work, 'custom', 'vm.json'), 'utf8')) as {
      vm: { network: { model: string } };
    };
    vmNic.vm.network.model = 'e1000';
    await rm(join(wrong, 'vm.json'));
    await writeFile(join(wrong, 'vm.json'), JSON.stringify(vmNic));
    ok(await cli(['base', 'import', wrong, '--name', 'wrongnic'], env2), 'import with another NIC');
    const failedResume = await cli(['launch', 'wrongnic'], env2);
    assert.equal(failedResume.code, 8, failedResume.stderr);
    assert.equal(failedResume.stderr.trim().split('\n').length, 1);
    assert.match(failedResume.stderr, /virtio-net.*likely cause: .*device set differs/);
    assert.deepEqual(await readdir(join(work, 'lib-wrong', 'instances')).catch(() => []), [], 'no instance left');
    assert.deepEqual(await qemuPids(), [], 'no QEMU left running');

    // QEMU missing from PATH (node and coreutils stay reachable).
    const bin = join(work, 'bin-without-qemu');
    await mkdir(bin, { recursive: true });
    for (const tool of ['cat', 'sh', 'tar', 'qemu-img'])
      await symlink(`/usr/bin/${tool}`, join(bin, tool)).catch(() => undefined);
    await expectFail(syn(overlay), 11, /qemu-system-x86_64 not found/, { ...env, PATH: bin });
  },
);

test(
  'early start: the VM runs before its overlay has arrived, reads its disk on demand, and stays safe',
  { skip: !hasQemu, timeout: 300_000 },
  async (t) => {
    assert.ok(baseId, 'the first test made a base');
    const overlay = join(work, 'app.overlay');
    const good = await readFile(overlay);
    // The stream waits at the first disk segment (memory comes first): while it waits, the VM
    // can only have run early, and every changed disk chunk it reads is fetched out of turn.
    const reader = await OverlayReader.open(overlay);
    const diskTarget = reader.header.targets.findIndex((x) => x.kind === 'disk');
    const firstDisk = reader.index.segments.find((s) => s.covers.some(([x]) => x === diskTarget));
    await reader.close();
    assert.ok(firstDisk, 'the overlay has disk records');
    const gate = firstDisk.offset;
    t.diagnostic(`overlay ${good.length} bytes, stream held at ${gate}`);
    const applied = ok(await cli(['apply', overlay, '--base', 'demo', '-o', join(work, 'applied')], env), 'apply');
    const appliedDisk = resolve(join(work, 'applied'), (applied.manifest as { disk: { path: string } }).disk.path);

    const instances = (): Promise<string[]> => readdir(join(work, 'lib', 'instances')).catch(() => []);
    const before = await instances();
    /** Polls the guest until it answers (the VM runs) or `limitMs` passes. */
    const answers = async (url: string, limitMs = 90_000): Promise<string> => {
      const end = Date.now() + limitMs;
      for (;;) {
        const r = await fetch(url, { signal: AbortSignal.timeout(2000) }).catch(() => undefined);
        if (r?.ok) return r.text();
        if (Date.now() > end) throw new Error(`${url} never answered`);
        await new Promise((res) => setTimeout(res, 250));
      }
    };
    const early = async (
      gateOpts: Omit<GateOptions, 'gate'>,
      extra: string[] = ['--detach'],
    ): Promise<{ server: GateServer; run: ReturnType<typeof cliChild>; port: number; statusUrl: string }> => {
      const server = await startGateServer(good, { gate, ...gateOpts });
      const port = await freePort();
      const statusUrl = `http://127.0.0.1:${port}/cgi-bin/status`;
      const run = cliChild(
        [
          'synthesize',
          server.url,
          '--base',
          'demo',
          '--early-start',
          '--forward',
          `${port}:8080`,
          '--wait-http',
          statusUrl,
          ...extra,
        ],
        env,
      );
      return { server, run, port, statusUrl };
    };

    // 1. Held stream, then a dropped connection (resumed with Range): the VM answers while the
    //    disk part has not been sent, reads a changed file from its disk (served on demand), and
    //    is, once everything is proven, on its own: synthesize returns, the VM stays (--detach).
    {
      const { server, run, statusUrl } = await early({ after: 'drop' });
      try {
        await server.reachedGate;
        const status = parseStatus(await answers(statusUrl));
        assert.equal(
          server.stats.streamBytes,
          gate,
          `the VM answered before the disk part was sent; requests:\n${server.log.join('\n')}`,
        );
        assert.equal(status.marker, marker, 'the customized disk, read before it arrived');
        const ps = ok(await cli(['ps'], env), 'ps') as { instances: Array<{ id: string; status: string }> };
        const iid = ps.instances.find((i) => !before.includes(i.id) && i.status === 'running')?.id;
        assert.ok(iid, 'the early instance is listed while it runs');
        // Out of the guest's page cache, so the bytes come over NBD from the held overlay.
        const sum = ok(
          await cli(
            ['console', iid, '--run', 'sync; echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/app/numbers.txt'],
            env,
          ),
          'console md5sum',
        );
        const want = createHash('md5')
          .update(Array.from({ length: 100000 }, (_, i) => `${i + 1}\n`).join(''))
          .digest('hex');
        assert.match(String(sum.output), new RegExp(`^${want}\\b`, 'm'), 'file contents read on demand are right');
        assert.ok(server.stats.rangedReads > 0, 'segments were fetched out of turn');
        assert.equal(server.stats.streamBytes, gate, 'still held');
        server.release();
        const r = await run.result;
        const j = ok(r, 'synthesize --early-start');
        const tm = j.timings_ms as Record<string, number>;
        t.diagnostic(`early start timings ${JSON.stringify(tm)}, ranged reads ${server.stats.rangedReads}`);
        for (const k of ['memory_proven', 'independent', 'early_segments_fetched', 'disk_switch'])
          assert.ok(k in tm, `timing ${k}`);
        assert.ok(tm['early_segments_fetched']! >= 1);
        assert.ok(tm['memory_proven']! < tm['independent']!);
        assert.deepEqual(j.download, { bytes: good.length, resumed: 1 }, 'the dropped stream was resumed');
        assert.equal(j.instance, iid);
        // Detached and independent: the VM answers with this process gone and the server closed.
        await server.close();
        assert.equal(parseStatus(await answers(statusUrl, 10_000)).marker, marker);
        const dir = String(j.dir);
        const cmp = spawnSync('qemu-img', ['compare', '-q', join(dir, 'disk.rebuilt.qcow2'), appliedDisk]);
        assert.equal(cmp.status, 0, `the rebuilt layer is the applied disk: ${String(cmp.stderr)}`);
        ok(await cli(['stop', iid], env), 'stop');
      } finally {
        await server.close();
      }
    }

    // 2. A segment damaged in transit after the VM started: it is stopped, nothing is left, the
    //    error says so (exit 4).
    {
      const { server, run, statusUrl } = await early({ after: 'continue', corruptAt: gate + 48 + 16 });
      try {
        await server.reachedGate;
        await answers(statusUrl);
        server.release();
        const r = await run.result;
        assert.equal(r.code, 4, `a damaged segment stops the early VM: ${r.stderr}`);
        assert.match(r.stderr, /after the VM had started/);
        assert.deepEqual(await qemuPids(), [], 'no QEMU left running');
        assert.deepEqual(await instances(), before, 'no instance left');
      } finally {
        await server.close();
      }
    }

    // 2b. A segment damaged on the ranged reads (the stream is intact): the guest's read of it
    //     fails, so the VM is not the overlay's any more: stopped, exit 4, without waiting for the rest.
    {
      const { server, run, statusUrl } = await early({ after: 'continue', corruptRangesAt: gate + 48 + 16 });
      try {
        await server.reachedGate;
        // The guest reads a damaged chunk as soon as it runs, or when told to: either way the run ends.
        const provoke = (async () => {
          await answers(statusUrl, 30_000);
          const ps = ok(await cli(['ps'], env), 'ps') as { instances: Array<{ id: string; status: string }> };
          const iid = ps.instances.find((i) => !before.includes(i.id) && i.status === 'running')?.id;
          if (iid) await cli(['console', iid, '--run', 'echo 3 > /proc/sys/vm/drop_caches; md5sum /mnt/app/*'], env);
        })();
        provoke.catch(() => undefined);
        await Promise.race([run.result, provoke]);
        const r = await run.result;
        assert.equal(r.code, 4, `a damaged out-of-turn segment stops the early VM: ${r.stderr}`);
        assert.match(r.stderr, /checksum|damaged/);
        assert.equal(server.stats.streamBytes, gate, 'the failure did not wait for the rest of the stream');
        assert.deepEqual(await qemuPids(), [], 'no QEMU left running');
        assert.deepEqual(await instances(), before, 'no instance left');
      } finally {
        await server.close();
      }
    }

    // 3. kill -9 of the synthesizer while the VM needs it: the VM is ended too, its directory
    //    removed (nothing would serve its disk any more).
    {
      const { server, run, statusUrl } = await early({ after: 'continue' });
      try {
        await server.reachedGate;
        await answers(statusUrl);
        run.child.kill('SIGKILL');
        await run.result;
        const end = Date.now() + 15_000;
        while (((await qemuPids()).length > 0 || (await instances()).length > before.length) && Date.now() < end)
          await new Promise((res) => setTimeout(res, 200));
        assert.deepEqual(await qemuPids(), [], 'no orphan QEMU');
        assert.deepEqual(await instances(), before, 'its instance directory is removed');
      } finally {
        await server.close();
      }
    }

    // 4. Early start needs the stream: with the sequential pipeline it is a usage error.
    const seq = await cli(['synthesize', overlay, '--base', 'demo', '--early-start', '--pipeline', 'sequential'], env);
    assert.equal(seq.code, 2, seq.stderr);
    assert.deepEqual(await qemuPids(), []);
  },
);
