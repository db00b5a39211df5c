/**
 * The semantic gap (issue 10): what the guest threw away, measured on the realistic Debian pair.
 *
 * The pair: the bench VM (Debian 12, 512 MiB, 2 GiB ext4) booted with a guest agent channel,
 * captured as a base, launched (resumed, disk with discard=unmap) and customized as a new user
 * would: `apt-get install python3-numpy qemu-guest-agent` (the .debs downloaded into the guest,
 * installed, then deleted by apt-get clean), the numpy service and qemu-ga started. That state is
 * snapshotted once ("none") and cached. Every technique then starts from that very state: the
 * snapshot is resumed, the technique applied through the agent (snapshot --trim / --freeze /
 * --zero-free-memory / --drop-caches), snapshotted again, and made into an overlay (with
 * `--free-blocks auto` for frozen snapshots). Per technique: overlay size, its memory part (a
 * memory-only overlay: memory comes first, so its records are the same), the disk part (the rest),
 * synthesis to the service's first answer, the RAM token, and for free-block overlays e2fsck -fn
 * on the rebuilt disk. A second base booted with init_on_free=1 gives the kernel's own zeroing.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { applyOverlay } from '../../src/api/apply.js';
import { createOverlay, type CreateResult } from '../../src/api/create.js';
import { snapshotVm, type SnapshotResult } from '../../src/api/snapshot.js';
import { synthesize } from '../../src/api/synthesize.js';
import { openLibraryBase } from '../../src/base/open.js';
import { resumeSpec, type VmSpec } from '../../src/spec/vm-spec.js';
import type { GuestPrepOptions } from '../../src/vm/guest-prep.js';
import { GuestAgent } from '../../src/vm/guest-agent.js';
import { startQemu } from '../../src/vm/process.js';
import { copySparse } from '../../src/vm/snapshot.js';
import { httpGet, waitHttp } from '../../src/vm/ready.js';
import { APP_PORT, benchVmSpec, ensureBenchVm } from '../../test/helpers/bench-vm.js';
import { cli } from '../../test/helpers/cli.js';
import { ensureDemoVm, freePort, parseStatus, repoRoot } from '../../test/helpers/demo-vm.js';
import { fmtBytes, median, must, table, timed } from './util.js';

const exec = promisify(execFile);

export interface SemanticOptions {
  work: string;
  /** Synthesis runs per overlay (median reported). */
  runs: number;
  /** Also the base booted with init_on_free=1 (a second pair: ~5 min to build once). */
  initOnFree: boolean;
}

interface SemanticPair {
  dir: string;
  variant: 'plain' | 'init_on_free';
  /** Snapshot directories: the base, and the customized VM before any technique. */
  base: string;
  custom: string;
  token: string;
  info: { bootSeconds: number; installSeconds: number; packages: string; debBytes: number };
}

/**
 * The customization, as console lines (each under the console's line limit). The bench guest's
 * initramfs has only the modules it boots with, and its Debian root has no /lib/modules: the
 * virtio-serial driver qemu-ga needs (virtio_console, from the same kernel package) is fetched
 * from the host and loaded — what udev does by itself on a full Debian.
 */
function installLines(url: string): string[] {
  return [
    `busybox wget -q -O /tmp/vc.ko ${url}/virtio_console.ko && busybox insmod /tmp/vc.ko && rm /tmp/vc.ko`,
    'export DEBIAN_FRONTEND=noninteractive; t0=$(cut -d. -f1 /proc/uptime)',
    'apt-get install -y -q --no-install-recommends python3-numpy qemu-guest-agent > /root/install.log 2>&1',
    // What apt downloaded and is about to delete (the bytes the guest throws away).
    'du -sb /var/cache/apt/archives | cut -f1 > /root/debs.bytes; secs=$(( $(cut -d. -f1 /proc/uptime) - t0 ))',
    'apt-get clean',
    `mkdir -p /opt/app && busybox wget -q -O /opt/app/server.py ${url}/server.py && echo bench-app > /marker`,
    '(cd /opt/app && setsid python3 server.py </dev/null >/tmp/app.log 2>&1 &)',
    // qemu-ga on the virtio-serial port (no udev here: find the port by its name).
    'N=$(grep -l org.qemu.guest_agent.0 /sys/class/virtio-ports/*/name) && P=$(basename $(dirname $N)) && ' +
      'qemu-ga -d -m virtio-serial -p /dev/$P -l /tmp/qemu-ga.log',
    'sync; echo "secs=$secs pkgs=$(grep -c ^Unpacking /root/install.log) debs=$(cat /root/debs.bytes)"',
  ];
}

async function ensureSemanticPair(variant: SemanticPair['variant'], log: (s: string) => void): Promise<SemanticPair> {
  const vm = await ensureBenchVm();
  const app = await readFile(join(repoRoot(), 'scripts', 'bench-vm', 'app', 'server.py'));
  const module = await virtioConsoleModule();
  const append = variant === 'init_on_free' ? `${vm.append} init_on_free=1` : vm.append;
  const key = createHash('sha256')
    .update(vm.buildKey)
    .update(app)
    .update(module)
    .update(JSON.stringify(installLines('URL')))
    .update(append)
    .update('semantic-pair v1')
    .digest('hex')
    .slice(0, 16);
  const cache =
    process.env['CLOUDLET_BENCH_PAIR_DIR'] ??
    join(process.env['XDG_CACHE_HOME'] ?? join(homedir(), '.cache'), 'cloudlet-overlay', 'semantic-pair');
  const dir = join(cache, key);
  const cached = await readFile(join(dir, 'pair.json'), 'utf8').catch(() => undefined);
  if (cached) return JSON.parse(cached) as SemanticPair;

  log(`building the ${variant} semantic pair in ${dir} (several minutes under TCG)`);
  const work = `${dir}.tmp-${process.pid}`;
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  const env = { ...process.env, CLOUDLET_LIBRARY: join(work, 'lib') };
  const run = async (args: string[], what: string, timeoutMs = 600_000): Promise<Record<string, unknown>> =>
    must(await cli(args, env, timeoutMs), what);
  let server: Server | undefined;
  try {
    const bootDisk = join(work, 'boot-disk.raw');
    await copySparse(vm.disk, bootDisk, { fsync: false });
    const port = await freePort();
    const spec: VmSpec = { ...benchVmSpec(vm, bootDisk, port), append, guestAgent: true };
    const t0 = performance.now();
    const booted = await startQemu(spec, { runDir: join(work, 'boot'), accel: 'auto' });
    const first = await waitHttp(`http://127.0.0.1:${port}/cgi-bin/status`, {
      timeoutMs: 180_000,
      signal: booted.exitSignal,
    });
    const bootSeconds = (performance.now() - t0) / 1000;
    const token = parseStatus(first.body).token;
    await booted.qmp.close();
    await run(['snapshot', '--qmp', booted.paths.qmpSocket, '-o', join(work, 'base'), '--then', 'quit'], 'base');
    await booted.waitExit(20_000).catch(() => booted.kill());
    await rm(bootDisk, { force: true });
    await run(['base', 'import', join(work, 'base'), '--name', 'sem'], 'base import', 1_800_000);

    server = createServer((req, res) => res.end(req.url === '/virtio_console.ko' ? module : app));
    const appPort = await new Promise<number>((resolve) =>
      server!.listen(0, '127.0.0.1', () => resolve((server!.address() as { port: number }).port)),
    );
    const p2 = await freePort();
    const launched = await run(['launch', 'sem', '--forward', `${p2}:${APP_PORT}`], 'launch');
    const iid = String(launched['instance']);
    let summary = '';
    const i0 = performance.now();
    for (const line of installLines(`http://10.0.2.2:${appPort}`)) {
      const out = await run(['console', iid, '--run', line, '--timeout', '1200s'], `customize: ${line}`, 1_300_000);
      if (out['status'] !== 0)
        throw new Error(`customize: ${line}: status ${String(out['status'])}: ${String(out['output'])}`);
      summary = String(out['output']).trim().split('\n').pop() ?? '';
    }
    const installSeconds = (performance.now() - i0) / 1000;
    const agentSocket = launched['agent_socket'] as string;
    const agent = await GuestAgent.connect(agentSocket, { timeoutMs: 20_000 });
    await agent.execute('guest-ping');
    agent.close();
    const answer = await waitHttp(`http://127.0.0.1:${p2}/`, {
      timeoutMs: 180_000,
      accept: (a) => a.status === 200 && a.body.includes('"bench-numpy"'),
    });
    if ((JSON.parse(answer.body) as { token: string }).token !== token) throw new Error('customized VM: wrong token');
    await run(['snapshot', '--instance', iid, '-o', join(work, 'custom'), '--then', 'quit'], 'custom snapshot');
    await run(['stop', iid], 'stop');
    const m = /secs=(\d+) pkgs=(\d+) debs=(\d+)/.exec(summary);
    await rm(join(work, 'lib'), { recursive: true, force: true });
    const pair: SemanticPair = {
      dir,
      variant,
      base: join(dir, 'base'),
      custom: join(dir, 'custom'),
      token,
      info: {
        bootSeconds: Math.round(bootSeconds),
        installSeconds: Number(m?.[1] ?? Math.round(installSeconds)),
        packages: m?.[2] ?? '?',
        debBytes: Number(m?.[3] ?? 0),
      },
    };
    await writeFile(join(work, 'pair.json'), JSON.stringify(pair, null, 2) + '\n');
    await rm(dir, { recursive: true, force: true });
    await rename(work, dir);
    log(`${variant} pair ready: ${summary}`);
    return pair;
  } catch (err) {
    await rm(work, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  } finally {
    server?.close();
  }
}

/** virtio_console.ko of the demo VM's kernel package (the bench VM boots the same kernel). */
async function virtioConsoleModule(): Promise<Buffer> {
  const demo = await ensureDemoVm();
  const debs = join(demo.dir, 'debs');
  const { stdout: ls } = await exec('sh', ['-c', `ls ${debs}/linux-image-*.deb | head -n1`]);
  const deb = ls.trim();
  const { stdout: list } = await exec('dpkg-deb', ['-c', deb], { maxBuffer: 64 << 20 });
  const path = /\S*\/virtio_console\.ko\b/.exec(list)?.[0];
  if (!path) throw new Error(`no virtio_console.ko in ${deb}`);
  const { stdout } = await exec('sh', ['-c', `dpkg-deb --fsys-tarfile '${deb}' | tar -xO '${path}'`], {
    encoding: 'buffer',
    maxBuffer: 16 << 20,
  });
  return stdout;
}

interface Technique {
  name: string;
  guest: GuestPrepOptions;
  freeBlocks?: boolean;
}

const TECHNIQUES: Technique[] = [
  { name: 'none (resumed, snapshotted again)', guest: {} },
  { name: '--trim', guest: { trim: true } },
  { name: '--freeze + create --free-blocks auto', guest: { freeze: true }, freeBlocks: true },
  { name: '--drop-caches', guest: { dropCaches: true } },
  { name: '--zero-free-memory', guest: { zeroFreeMemory: true } },
  { name: '--zero-free-memory --trim', guest: { zeroFreeMemory: true, trim: true } },
  {
    name: '--zero-free-memory --freeze + --free-blocks auto',
    guest: { zeroFreeMemory: true, freeze: true },
    freeBlocks: true,
  },
  { name: '--drop-caches --zero-free-memory', guest: { dropCaches: true, zeroFreeMemory: true } },
  {
    name: '--drop-caches --zero-free-memory --trim --freeze + --free-blocks auto',
    guest: { dropCaches: true, zeroFreeMemory: true, trim: true, freeze: true },
    freeBlocks: true,
  },
];

const INIT_ON_FREE_TECHNIQUES: Technique[] = [
  { name: 'none (resumed, snapshotted again)', guest: {} },
  { name: '--trim', guest: { trim: true } },
  { name: '--freeze + create --free-blocks auto', guest: { freeze: true }, freeBlocks: true },
  { name: '--drop-caches', guest: { dropCaches: true } },
  { name: '--drop-caches --trim', guest: { dropCaches: true, trim: true } },
];

interface Row {
  technique: string;
  size: number;
  memory: number;
  disk: number;
  /** A disk-only overlay of the same snapshot (a VM that boots from it). */
  diskOnly: number;
  createMs: number;
  prepMs: number;
  firstAnswerMs: number;
  totalMs: number;
  thaw?: string;
  e2fsck?: string;
  leftOut?: number;
}

async function measurePair(pair: SemanticPair, techniques: Technique[], o: SemanticOptions): Promise<Row[]> {
  const work = join(o.work, `sem-${pair.variant}`);
  await mkdir(work, { recursive: true });
  const root = join(work, 'lib');
  const env = { ...process.env, CLOUDLET_LIBRARY: root };
  const imported = must(await cli(['base', 'import', pair.base, '--name', 'sem'], env, 1_800_000), 'base import');
  const base = await openLibraryBase(root, String(imported['id']));
  const spec = (JSON.parse(await readFile(join(pair.custom, 'vm.json'), 'utf8')) as { vm: VmSpec }).vm;
  const rows: Row[] = [];
  try {
    for (const [i, tech] of techniques.entries()) {
      // Resume the customized VM exactly as it was snapshotted, from a copy of its disk.
      const dir = join(work, `t${i}`);
      await mkdir(dir, { recursive: true });
      const disk = join(dir, 'disk.qcow2');
      await copySparse(join(pair.custom, 'disk.qcow2'), disk, { fsync: false });
      await exec('qemu-img', ['rebase', '-u', '-f', 'qcow2', '-b', base.diskPath!, '-F', 'raw', disk]);
      const port = await freePort();
      const s = resumeSpec(
        { ...spec, kernel: join(base.dir, 'kernel'), initrd: join(base.dir, 'initrd') },
        {
          incoming: { from: 'file', path: join(pair.custom, 'memory.stream') },
          driveFiles: [disk],
          forwards: [{ hostPort: port, guestPort: APP_PORT }],
        },
      );
      const vm = await startQemu(s, { runDir: join(dir, 'run'), accel: 'auto' });
      let snap: SnapshotResult;
      try {
        await waitHttp(`http://127.0.0.1:${port}/`, { timeoutMs: 120_000, signal: vm.exitSignal });
        await vm.qmp.close();
        snap = await snapshotVm({
          root,
          qmp: vm.paths.qmpSocket,
          agentSocket: vm.paths.agentSocket,
          serialSocket: vm.paths.serialSocket,
          outDir: join(dir, 'snap'),
          afterCapture: 'quit',
          guest: { ...tech.guest, via: 'agent' },
        });
        await vm.waitExit(20_000).catch(() => vm.kill());
      } catch (err) {
        vm.kill();
        throw err;
      }
      const prepMs = Object.entries(snap.timings_ms)
        .filter(([k]) => !['migrate', 'disk_copy', 'total'].includes(k))
        .reduce((n, [, v]) => n + v, 0);
      const overlay = join(dir, 'app.overlay');
      const [created, createMs] = await timed(() =>
        createOverlay({
          base,
          disk: snap.disk,
          memory: join(dir, 'snap', 'memory.stream'),
          output: overlay,
          freeBlocks: tech.freeBlocks ? 'auto' : 'off',
        }),
      );
      const memOnly: CreateResult = await createOverlay({
        base,
        memory: join(dir, 'snap', 'memory.stream'),
        output: join(dir, 'memory.overlay'),
      });
      const diskOnly: CreateResult = await createOverlay({
        base,
        disk: snap.disk,
        output: join(dir, 'disk.overlay'),
        freeBlocks: tech.freeBlocks ? 'auto' : 'off',
      });
      const row: Row = {
        technique: tech.name,
        size: created.size,
        memory: memOnly.size,
        disk: created.size - memOnly.size,
        diskOnly: diskOnly.size,
        createMs,
        prepMs,
        firstAnswerMs: 0,
        totalMs: 0,
        leftOut: created.free_blocks?.chunks_left_out,
      };
      if (tech.freeBlocks && !created.free_blocks?.file_systems.some((f) => f.trusted)) {
        throw new Error(
          `${tech.name}: the frozen snapshot's file system is not trusted: ${JSON.stringify(created.free_blocks)}`,
        );
      }
      // Synthesis → the service's first answer, with the base's RAM token.
      const firsts: number[] = [];
      const totals: number[] = [];
      for (let r = 0; r < o.runs; r++) {
        const p = await freePort();
        const syn = await synthesize({
          root,
          base: 'sem',
          overlay,
          forwards: [{ hostPort: p, guestPort: APP_PORT }],
          waitHttp: `http://127.0.0.1:${p}/`,
          readyTimeoutMs: 180_000,
          launcher: 'qemu',
        });
        const a = JSON.parse(syn.result.answer?.body ?? '{}') as { token?: string; app?: string };
        if (a.token !== pair.token || a.app !== 'bench-numpy')
          throw new Error(`${tech.name}: wrong answer ${syn.result.answer?.body}`);
        row.thaw = syn.result.guest_thaw;
        // A second request: the guest works after the thaw (writes to its disk too).
        if (tech.guest.freeze) {
          const w = await httpGet(`http://127.0.0.1:${p}/`, { timeoutMs: 30_000 });
          if (w.status !== 200) throw new Error(`${tech.name}: second answer ${w.status}`);
        }
        firsts.push(syn.result.timings_ms['first_response'] ?? 0);
        totals.push(syn.result.timings_ms['total'] ?? 0);
        await syn.vm.stop();
        await rm(syn.state.dir, { recursive: true, force: true });
      }
      row.firstAnswerMs = median(firsts);
      row.totalMs = median(totals);
      if (tech.freeBlocks) row.e2fsck = await fsckRebuilt(base, overlay, join(dir, 'rebuilt'));
      rows.push(row);
      console.error(`bench: semantic ${pair.variant}: ${tech.name}: ${fmtBytes(row.size)}`);
      await rm(join(dir, 'snap'), { recursive: true, force: true });
      await rm(disk, { force: true });
    }
  } finally {
    await base.close();
  }
  return rows;
}

/** Rebuilds the overlay's disk as raw and runs e2fsck -fn on it: a frozen file system must be clean. */
async function fsckRebuilt(
  base: Awaited<ReturnType<typeof openLibraryBase>>,
  overlay: string,
  out: string,
): Promise<string> {
  await applyOverlay({ overlay, base, outDir: out, diskFormat: 'raw', memoryFormat: 'sparse', durable: false });
  try {
    const r = await exec('e2fsck', ['-fn', join(out, 'disk.raw')]).then(
      (x) => ({ code: 0, out: x.stdout }),
      (e: { code?: number; stdout?: string }) => ({ code: e.code ?? -1, out: e.stdout ?? '' }),
    );
    if (r.code !== 0) throw new Error(`e2fsck -fn on the rebuilt disk: status ${r.code}\n${r.out}`);
    return 'clean';
  } finally {
    await rm(out, { recursive: true, force: true });
  }
}

function report(pair: SemanticPair, rows: Row[]): void {
  const none = rows[0]!;
  console.log(
    `\nSemantic gap, ${pair.variant === 'init_on_free' ? 'base booted with init_on_free=1' : 'plain base'}: ` +
      `Debian 12 guest, 512 MiB RAM, 2 GiB disk; apt-get install python3-numpy qemu-guest-agent in the resumed base ` +
      `(${pair.info.packages} packages, ${fmtBytes(pair.info.debBytes)} of .debs downloaded and deleted, ` +
      `${pair.info.installSeconds} s; base boot ${pair.info.bootSeconds} s)`,
  );
  console.log(
    table([
      [
        'technique',
        'overlay',
        'vs none',
        'memory part',
        'disk part',
        'disk-only overlay',
        'guest prep (ms)',
        'create (ms)',
        'first answer (ms)',
        'synthesis total (ms)',
        'checks',
      ],
      ...rows.map((r) => [
        r.technique,
        fmtBytes(r.size),
        (r.size / none.size).toFixed(2),
        fmtBytes(r.memory),
        fmtBytes(r.disk),
        fmtBytes(r.diskOnly),
        String(Math.round(r.prepMs)),
        String(Math.round(r.createMs)),
        String(r.firstAnswerMs),
        String(r.totalMs),
        [
          'token ok',
          r.thaw ? `thaw: ${r.thaw}` : '',
          r.e2fsck ? `e2fsck ${r.e2fsck}` : '',
          r.leftOut ? `${r.leftOut} free chunks left out` : '',
        ]
          .filter(Boolean)
          .join(', '),
      ]),
    ]),
  );
}

export async function semanticBench(o: SemanticOptions): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  const log = (s: string): void => console.error(`bench: ${s}`);
  const plain = await ensureSemanticPair('plain', log);
  const rows = await measurePair(plain, TECHNIQUES, o);
  report(plain, rows);
  out['plain'] = { info: plain.info, rows };
  if (o.initOnFree) {
    const iof = await ensureSemanticPair('init_on_free', log);
    const r2 = await measurePair(iof, INIT_ON_FREE_TECHNIQUES, o);
    report(iof, r2);
    out['init_on_free'] = { info: iof.info, rows: r2 };
  }
  return out;
}
