/**
 * Bounded under hostile input (issue 9, part 3): each crafted input the issue found, reproduced.
 * Every one must end within seconds, under 512 MB RSS, with its documented exit code and nothing
 * written: a tiny overlay inflating to megabytes of zeros (verify caps its problem list), a
 * 2^50-byte RAM block, 20k targets, package members that are not regular files, endless and
 * stalled downloads, ANSI escapes in header strings, a truncated qcow2, and a long loop that
 * must yield so signals are handled.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, execFileSync, spawn } from 'node:child_process';
import { once } from 'node:events';
import { createServer, type Server } from 'node:http';
import { mkdir, mkdtemp, readdir, readFile, rm, stat, symlink, writeFile, link } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BIN, cli } from '../helpers/cli.js';
import { craftOverlay, headerOf } from '../helpers/craft.js';
import { createTiny, importTiny, makeTinyVm, type TinyVm } from '../helpers/tiny-vm.js';
import { installFakeQemu } from '../helpers/fake-qemu.js';
import { HEADER_FIXED } from '../../src/overlay/format.js';
import { OverlayWriter } from '../../src/overlay/writer.js';
import { Assembler, type AssemblyOutput } from '../../src/delta/assemble.js';
import { MemoryChunkStore } from '../../src/delta/chunk-store.js';
import { ChunkMap } from '../../src/delta/chunk-map.js';
import type { BaseTarget } from '../../src/delta/target.js';
import { CHUNK_SIZE } from '../../src/delta/chunk.js';

const RSS = fileURLToPath(new URL('../helpers/run-rss.js', import.meta.url));
const MAX_RSS_KIB = 512 * 1024;

let dir: string;
let env: NodeJS.ProcessEnv;
let tiny: TinyVm;
let baseId: string;
let baseTargets: Array<{ name: string; kind: string; size: number; digest: string }>;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
  ms: number;
  rssKiB: number;
}

/** The CLI in a child that reports its peak RSS; `--json` first. */
function runRss(args: string[], e: NodeJS.ProcessEnv = env, timeoutMs = 30_000): Promise<Run> {
  const t0 = Date.now();
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [RSS, '--json', ...args],
      { env: e, timeout: timeoutMs, maxBuffer: 64 << 20 },
      (err, stdout, stderr) => {
        const m = /maxrss_kib=(\d+)\s*$/.exec(stderr);
        const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? Number(err.code) : -1) : 0;
        resolve({ code, stdout, stderr, ms: Date.now() - t0, rssKiB: m ? Number(m[1]) : -1 });
      },
    );
  });
}

function bounded(r: Run, code: number, what: string, maxMs = 10_000): Record<string, unknown> {
  assert.equal(r.code, code, `${what}: exit ${r.code}: ${r.stderr}`);
  assert.ok(r.ms < maxMs, `${what}: took ${r.ms} ms`);
  assert.ok(r.rssKiB > 0 && r.rssKiB < MAX_RSS_KIB, `${what}: peak RSS ${r.rssKiB} KiB`);
  const lines = r.stdout.trim().split('\n');
  assert.equal(lines.length, 1, `${what}: one JSON object on stdout`);
  const json = JSON.parse(lines[0]!) as Record<string, unknown>;
  assert.equal(json.exit_code ?? 0, code, `${what}: JSON exit_code`);
  return json;
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-hostile-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib'), XDG_CONFIG_HOME: join(dir, 'config') };
  tiny = await makeTinyVm(join(dir, 'vm'), 11, 16); // 16 MiB: a spec QEMU can be started with
  baseId = await importTiny(tiny, env);
  const show = await cli(['base', 'show', 'tiny'], env);
  baseTargets = show.json.targets as typeof baseTargets;
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('a 3 KB overlay inflating to 20 MiB of zeros: verify caps its problem list and says how many more', async () => {
  const file = join(dir, 'zeros.overlay');
  const disk = baseTargets.find((t) => t.kind === 'disk')!;
  await writeFile(
    file,
    craftOverlay({
      header: headerOf(baseId, baseTargets, [{ name: 'disk', kind: 'disk', size: disk.size }]),
      segments: [{ raw: Buffer.alloc(20 << 20), records: 1 }],
    }),
  );
  assert.ok((await stat(file)).size < 4096, 'the crafted overlay is small');
  const r = await runRss(['verify', file]);
  const json = bounded(r, 4, 'verify');
  const problems = json.problems as string[];
  assert.ok(problems.length <= 100, `${problems.length} problems listed`);
  assert.ok(Number(json.problems_omitted) > 1_000_000, `omitted: ${String(json.problems_omitted)}`);
  assert.ok(r.stdout.length < 64 * 1024, `JSON of ${r.stdout.length} bytes`);
  // apply refuses it before anything is written (the first record is already wrong).
  const out = join(dir, 'zeros-out');
  const a = await runRss(['apply', file, '--base', 'tiny', '-o', out]);
  bounded(a, 4, 'apply');
  assert.deepEqual(await readdir(out).catch(() => []), [], 'nothing written');
});

test('SIGINT during a long verify: exit 130, one JSON object', async () => {
  const file = join(dir, 'zeros-big.overlay');
  const disk = baseTargets.find((t) => t.kind === 'disk')!;
  await writeFile(
    file,
    craftOverlay({
      header: headerOf(baseId, baseTargets, [{ name: 'disk', kind: 'disk', size: disk.size }]),
      segments: Array.from({ length: 8 }, () => ({ raw: Buffer.alloc(64 << 20), records: 1 })),
    }),
  );
  const child = spawn(process.execPath, [BIN, '--json', 'verify', file], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  const exited = once(child, 'exit') as Promise<[number | null, NodeJS.Signals | null]>;
  await new Promise((r) => setTimeout(r, 700));
  const t0 = Date.now();
  child.kill('SIGINT');
  const [code] = await exited;
  assert.equal(code, 130);
  assert.ok(Date.now() - t0 < 3000, `ended ${Date.now() - t0} ms after SIGINT`);
  const lines = out.trim().split('\n');
  assert.equal(lines.length, 1, `one JSON object: ${out}`);
  assert.equal((JSON.parse(lines[0]!) as { exit_code: number }).exit_code, 130);
});

test('a declared 2^50-byte RAM block (apply --memory-format raw) is refused at once', async () => {
  const huge = 2 ** 50;
  const ram = { name: 'pc.ram', kind: 'ram', size: huge };
  // Lying about the base too (a base block of 2^50): the base it names has no such block.
  const lyingBase = baseTargets.map((t) => (t.name === 'pc.ram' ? { ...t, size: huge } : t));
  for (const [what, header] of [
    ['RAM block larger than the base', headerOf(baseId, baseTargets, [ram])],
    ['base targets that are not the base', headerOf(baseId, lyingBase, [ram])],
  ] as const) {
    const file = join(dir, 'huge-ram.overlay');
    await writeFile(file, craftOverlay({ header, segments: [] }));
    const out = join(dir, 'huge-out');
    const r = await runRss(['apply', file, '--base', 'tiny', '--memory-format', 'raw', '-o', out]);
    bounded(r, 4, what, 5000);
    assert.deepEqual(await readdir(out).catch(() => []), [], `${what}: nothing written`);
  }
});

test('a header with 20k targets: refused, bounded cost', async () => {
  const targets = Array.from({ length: 20_000 }, (_, i) => ({ name: `t${i}`, kind: 'disk', size: 4096 }));
  const file = join(dir, 'many.overlay');
  await writeFile(file, craftOverlay({ header: headerOf(baseId, baseTargets, targets), segments: [] }));
  const r = await runRss(['verify', file]);
  bounded(r, 4, '20k targets', 5000);
  assert.match(r.stderr, /at most 1024/);
});

test('package members that are not regular files or directories are refused at once', async () => {
  const root = join(dir, 'pkgs');
  const id = 'a'.repeat(64);
  const cases: Array<[string, (d: string) => Promise<void>]> = [
    ['FIFO', async (d) => void execFileSync('mkfifo', [join(d, 'manifest.json')])],
    ['symlink', (d) => symlink('/etc/passwd', join(d, 'manifest.json'))],
    [
      'hard link',
      async (d) => {
        await writeFile(join(d, 'a'), 'x');
        await link(join(d, 'a'), join(d, 'manifest.json'));
      },
    ],
  ];
  if (process.getuid?.() === 0) {
    cases.push(['device', async (d) => void execFileSync('mknod', [join(d, 'manifest.json'), 'b', '8', '0'])]);
  }
  for (const [what, make] of cases) {
    const d = join(root, what.replace(' ', '-'), id);
    await mkdir(d, { recursive: true });
    await make(d);
    const pkg = join(root, `${what.replace(' ', '-')}.tar`);
    execFileSync('tar', ['-cf', pkg, '-C', join(root, what.replace(' ', '-')), id]);
    const lib = join(dir, `lib-${what.replace(' ', '-')}`);
    const r = await runRss(['base', 'import', pkg], { ...env, CLOUDLET_LIBRARY: lib });
    bounded(r, 4, what, 5000);
    assert.match(
      r.stderr,
      new RegExp(`holds a ${what === 'device' ? 'block device' : what === 'symlink' ? 'symbolic link' : what}`, 'i'),
    );
    assert.deepEqual(await readdir(join(lib, 'bases')).catch(() => []), [], `${what}: nothing imported`);
  }
  // Names that leave the directory, given to tar as such.
  const d = join(root, 'dots');
  await mkdir(join(d, id), { recursive: true });
  await writeFile(join(d, id, 'manifest.json'), '{}');
  const dots = join(root, 'dots.tar');
  execFileSync('tar', ['-cf', dots, '-C', d, '--transform', `s,^${id}/manifest.json,${id}/../escaped,`, id]);
  bounded(await runRss(['base', 'import', dots], { ...env, CLOUDLET_LIBRARY: join(dir, 'lib-dots') }), 4, '..', 5000);
  // The package itself a FIFO: refused, not waited on.
  const fifo = join(root, 'fifo.tar');
  execFileSync('mkfifo', [fifo]);
  const f = await runRss(['base', 'import', fifo], { ...env, CLOUDLET_LIBRARY: join(dir, 'lib-fifo') });
  bounded(f, 3, 'a FIFO as the package', 5000);
});

test('FIFOs given as inputs are refused at once, never waited on', async () => {
  const fifo = join(dir, 'input.fifo');
  execFileSync('mkfifo', [fifo]);
  bounded(await runRss(['info', fifo]), 3, 'overlay FIFO', 5000);
  bounded(
    await runRss(['create', '--base', 'tiny', '--memory', fifo, '-o', join(dir, 'f.overlay')]),
    3,
    'memory FIFO',
    5000,
  );
  bounded(
    await runRss(['create', '--base', 'tiny', '--disk', fifo, '-o', join(dir, 'f.overlay')]),
    3,
    'disk FIFO',
    5000,
  );
  bounded(
    await runRss(['base', 'import', '--disk', tiny.baseDisk, '--memory', tiny.baseMem, '--vm', fifo]),
    3,
    'VM spec FIFO',
    5000,
  );
  bounded(await runRss(['verify', join(dir, 'x.overlay'), '--trust', fifo]), 3, 'trusted key FIFO', 5000);
});

test('downloads: an endless body, a stalled server, a declared length over --max-size', async () => {
  // A real overlay header (so the stream gets past it), then what a hostile server sends.
  const good = join(dir, 'for-download.overlay');
  await createTiny(tiny, env, good);
  const bytes = await readFile(good);
  const head = bytes.subarray(0, HEADER_FIXED + bytes.readUInt32LE(12) + 32);
  const bigFrame = Buffer.alloc(48);
  bigFrame.write('CSEG', 0, 'latin1');
  bigFrame.writeUInt32LE(200 << 20, 4); // a 200 MiB segment frame: within the format's limits
  bigFrame.writeUInt32LE(200 << 20, 8);
  const server: Server = createServer((req, res) => {
    if (req.url === '/endless') {
      res.writeHead(200);
      res.write(head);
      res.write(bigFrame);
      const chunk = Buffer.alloc(64 << 10, 7);
      const pump = (): void => {
        while (res.write(chunk));
        res.once('drain', pump);
      };
      pump();
      req.on('close', () => res.destroy());
    } else if (req.url === '/stalled') {
      res.writeHead(200, { 'content-length': '1000000' });
      res.write(head);
      // …and nothing more.
    } else {
      res.writeHead(200, { 'content-length': String(10 * 2 ** 30) });
      res.write(Buffer.alloc(10));
    }
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  try {
    const syn = (path: string, extra: string[]): string[] => [
      'synthesize',
      `http://127.0.0.1:${port}${path}`,
      '--base',
      'tiny',
      '--detach',
      ...extra,
    ];
    // QEMU starts while the overlay streams in: a stand-in that takes whatever it is fed.
    const fake = join(dir, 'fakebin');
    await mkdir(fake, { recursive: true });
    await installFakeQemu(fake);
    const e = { ...env, PATH: `${fake}:${process.env.PATH ?? ''}` };
    const endless = await runRss(syn('/endless', ['--max-size', '8M']), e);
    bounded(endless, 12, 'endless body', 10_000);
    assert.match(endless.stderr, /more than the 8388608 bytes allowed/);
    const stalled = await runRss(syn('/stalled', ['--idle-timeout', '500ms']), e);
    bounded(stalled, 12, 'stalled server', 10_000);
    const big = await runRss(syn('/big', ['--max-size', '1G']), e);
    bounded(big, 12, 'declared length', 5000);
    assert.deepEqual(
      (await readdir(join(dir, 'lib', 'tmp')).catch(() => [])).filter((n) => n.startsWith('download-')),
      [],
      'no download left behind',
    );
  } finally {
    server.closeAllConnections();
    server.close();
  }
});

test('header strings reach the terminal with their control characters escaped', async () => {
  const file = join(dir, 'ansi.overlay');
  const infos = baseTargets.map((t) => ({ ...t, kind: t.kind as 'disk' | 'ram' | 'blob' }));
  const w = await OverlayWriter.create(file, {
    format: 'cloudlet-overlay',
    version: [1, 1],
    createdAt: '\u001b]0;owned\u0007\u001b[2J',
    creator: '\u001b[31mEVIL\u001b[0m\u009b6n',
    chunkSize: 4096,
    base: { id: baseId, targets: infos },
    targets: [],
    compression: { codec: 'zstd', level: 3 },
  });
  await w.finish([], { encodings: {}, targets: {}, bytesRead: 0 });
  const human = execFileSync(process.execPath, [BIN, 'info', file], { env, encoding: 'utf8' });
  // eslint-disable-next-line no-control-regex
  assert.doesNotMatch(human, /[\u0000-\u0008\u000b-\u001f\u007f-\u009f]/, 'no control character printed');
  assert.match(human, /\\x1b\[31mEVIL/);
});

test('a truncated qcow2 input is refused, not read as zeros', async () => {
  const img = join(dir, 'cust.qcow2');
  execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', tiny.custDisk, img]);
  const full = (await stat(img)).size;
  execFileSync('truncate', ['-s', String(Math.floor(full / 2)), img]);
  const out = join(dir, 'trunc.overlay');
  const r = await runRss(['create', '--base', 'tiny', '--disk', img, '-o', out]);
  bounded(r, 4, 'truncated qcow2');
  assert.equal(await stat(out).catch(() => undefined), undefined, 'no overlay written');
});

test('a long loop without I/O yields: timers (and so signals) run while it works', async () => {
  const size = 2 ** 36; // 16M chunks, all zero: no I/O at all
  const source = { name: 'pc.ram', size, read: () => Promise.resolve(), dataExtents: () => Promise.resolve([]) };
  const map = await ChunkMap.build(source);
  const base: BaseTarget[] = [{ name: 'pc.ram', kind: 'ram', size, source, map }];
  let stop = false;
  let puts = 0;
  const out: AssemblyOutput = {
    everyChunk: true,
    ordered: false,
    put() {
      puts++;
      if (stop) throw new Error('stopped by the timer');
      return Promise.resolve();
    },
    finish: () => Promise.resolve(),
  };
  const a = new Assembler(base, [{ name: 'pc.ram', kind: 'ram', size, digest: map.digest() }], {
    passes: false,
    store: new MemoryChunkStore(),
  });
  a.attach([out]);
  const t0 = Date.now();
  let firedAt = -1;
  setTimeout(() => {
    firedAt = Date.now() - t0;
    stop = true;
  }, 50);
  await assert.rejects(a.finish(), /stopped by the timer/);
  assert.ok(firedAt >= 0 && firedAt < 1000, `the timer ran ${firedAt} ms in (after ${puts} chunks)`);
  assert.ok(puts < size / CHUNK_SIZE, 'stopped long before the end');
});
