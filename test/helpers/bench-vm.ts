/**
 * The realistic benchmark pair: a Debian 12 base VM (512 MiB RAM, 2 GiB disk; built by
 * scripts/bench-vm/build.sh) booted and snapshotted, then *resumed* from that snapshot and
 * customized as a user would — `apt-get install python3-numpy` from the Debian mirror, the
 * archives deleted, a numpy HTTP service started — and snapshotted again. Building it takes
 * minutes under TCG, so the pair is cached by a key over everything that made it.
 */
import { createHash } from 'node:crypto';
import { execFile } from 'node:child_process';
import { createServer, type Server } from 'node:http';
import { mkdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { homedir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { copySparse } from '../../src/vm/snapshot.js';
import { startQemu } from '../../src/vm/process.js';
import type { VmSpec } from '../../src/spec/vm-spec.js';
import { httpGet, waitHttp } from '../../src/vm/ready.js';
import { cli, ok } from './cli.js';
import { freePort, parseStatus, repoRoot } from './demo-vm.js';

const exec = promisify(execFile);

/** bench-vm.json as written by build.sh. */
export interface BenchVm {
  dir: string;
  kernel: string;
  initrd: string;
  disk: string;
  append: string;
  machine: string;
  memoryMiB: number;
  cpu: string;
  smp: number;
  guestPort: number;
  buildKey: string;
}

/** Where the guest's numpy service listens (the base's status page is on guestPort). */
export const APP_PORT = 8000;

export interface BenchPair {
  dir: string;
  /** Snapshot directories (memory.stream, disk.*, vm.json) as `snapshot` writes them. */
  base: string;
  custom: string;
  /** Boot token of the base boot: the customized VM must answer with the same one. */
  token: string;
  /** The numpy service's answer in the customized VM before its snapshot. */
  appAnswer: { token: string; app: string; check: number };
  /** What the customization did, for the report. */
  info: { installSeconds: number; packages: string; diskUsedKiB: number; memoryStreamBytes: number };
}

export async function ensureBenchVm(): Promise<BenchVm> {
  const script = join(repoRoot(), 'scripts', 'bench-vm', 'build.sh');
  await exec('bash', [script], { maxBuffer: 16 << 20 }).catch((err: Error & { stderr?: string }) => {
    throw new Error(`bench VM build failed: ${err.message}\n${(err.stderr ?? '').slice(-4000)}`);
  });
  const { stdout } = await exec('bash', [script, '--print-dir']);
  return JSON.parse(await readFile(join(stdout.trim(), 'bench-vm.json'), 'utf8')) as BenchVm;
}

export function benchVmSpec(vm: BenchVm, disk: string, port: number): VmSpec {
  return {
    machine: vm.machine,
    memoryMiB: vm.memoryMiB,
    cpu: vm.cpu,
    smp: vm.smp,
    kernel: vm.kernel,
    initrd: vm.initrd,
    append: vm.append,
    drives: [{ file: disk, format: 'raw', if: 'virtio' }],
    network: { model: 'virtio-net-pci', romfile: '', forwards: [{ hostPort: port, guestPort: vm.guestPort }] },
    name: 'cloudlet-bench',
  };
}

/** The customization typed into the resumed base's console, as one shell line. */
function installScript(appUrl: string): string {
  return [
    'export DEBIAN_FRONTEND=noninteractive',
    't0=$(cut -d. -f1 /proc/uptime)',
    'apt-get install -y -q --no-install-recommends python3-numpy > /root/install.log 2>&1',
    'apt-get clean',
    'mkdir -p /opt/app',
    `busybox wget -q -O /opt/app/server.py ${appUrl}`,
    'echo bench-app > /marker',
    '(cd /opt/app && setsid python3 server.py </dev/null >/tmp/app.log 2>&1 &)',
    'sync',
    'echo "secs=$(( $(cut -d. -f1 /proc/uptime) - t0 )) pkgs=$(grep -c ^Unpacking /root/install.log)' +
      ' used=$(df -k / | tail -n1 | tr -s " " | cut -d" " -f3)"',
  ].join(' && ');
}

/** Bump when the way a pair is made changes (the cache key covers the VM, the app and the script). */
const PAIR_VERSION = 2;

export interface PairOptions {
  /**
   * `sync; echo 3 > /proc/sys/vm/drop_caches` in the guest just before the snapshot: the page cache
   * (the installed files) leaves memory, so the overlay's memory part is small and its disk part
   * carries the data — the case early start is for.
   */
  dropCaches?: boolean;
  /**
   * Flags for the customized VM's `snapshot` (e.g. `--drop-caches --zero-free-memory --trim`,
   * docs/semantic-gap.md): a guest prepared so that little of the change sits in memory.
   */
  snapshotFlags?: string[];
}

/** Builds (or finds in the cache) the realistic pair. `log` gets progress lines. */
export async function ensureBenchPair(
  log: (s: string) => void = () => undefined,
  options: PairOptions = {},
): Promise<BenchPair> {
  const vm = await ensureBenchVm();
  const app = await readFile(join(repoRoot(), 'scripts', 'bench-vm', 'app', 'server.py'));
  const key = createHash('sha256')
    .update(vm.buildKey)
    .update(app)
    .update(installScript('URL'))
    .update(`v${PAIR_VERSION} ${options.dropCaches ? 'drop-caches' : ''}`)
    .update(options.snapshotFlags?.length ? ` ${options.snapshotFlags.join(' ')}` : '')
    .digest('hex')
    .slice(0, 16);
  const cache =
    process.env['CLOUDLET_BENCH_PAIR_DIR'] ??
    join(process.env['XDG_CACHE_HOME'] ?? join(homedir(), '.cache'), 'cloudlet-overlay', 'bench-pair');
  const dir = join(cache, key);
  const cached = await readFile(join(dir, 'pair.json'), 'utf8').catch(() => undefined);
  if (cached) return JSON.parse(cached) as BenchPair;

  log(`building the realistic pair in ${dir} (several minutes under TCG)`);
  await mkdir(cache, { recursive: true });
  const work = `${dir}.tmp-${process.pid}`;
  await rm(work, { recursive: true, force: true });
  await mkdir(work, { recursive: true });
  const root = join(work, 'lib');
  const env = { ...process.env, CLOUDLET_LIBRARY: root };
  const must = async (args: string[], what: string, timeoutMs?: number): Promise<Record<string, unknown>> =>
    ok(await cli(args, env, timeoutMs), what);
  let server: Server | undefined;
  try {
    // Base: boot from a private copy of the disk, wait for the status page, snapshot, quit.
    const bootDisk = join(work, 'boot-disk.raw');
    await copySparse(vm.disk, bootDisk, { fsync: false });
    const port = await freePort();
    const booted = await startQemu(benchVmSpec(vm, bootDisk, port), { runDir: join(work, 'boot'), accel: 'auto' });
    const status = `http://127.0.0.1:${port}/cgi-bin/status`;
    const first = await waitHttp(status, { timeoutMs: 120_000, signal: booted.exitSignal });
    const token = parseStatus(first.body).token;
    await booted.qmp.close();
    await must(
      ['snapshot', '--qmp', booted.paths.qmpSocket, '-o', join(work, 'base'), '--then', 'quit'],
      'base snapshot',
    );
    await booted.waitExit(20_000).catch(() => booted.kill());
    await rm(bootDisk, { force: true });
    log('base captured; resuming it to install python3-numpy');

    // Customize the resumed base: packages from the mirror, the app from us (guest → 10.0.2.2).
    await must(['base', 'import', join(work, 'base'), '--name', 'bench'], 'base import', 600_000);
    server = createServer((_req, res) => res.end(app));
    const appPort = await new Promise<number>((resolve) =>
      server!.listen(0, '127.0.0.1', () => resolve((server!.address() as { port: number }).port)),
    );
    const [p1, p2] = [await freePort(), await freePort()];
    const launched = await must(
      ['launch', 'bench', '--forward', `${p1}:${vm.guestPort}`, '--forward', `${p2}:${APP_PORT}`],
      'launch',
    );
    const iid = String(launched['instance']);
    const t0 = performance.now();
    const out = await must(
      ['console', iid, '--run', installScript(`http://10.0.2.2:${appPort}/server.py`), '--timeout', '1200s'],
      'install',
      1_300_000,
    );
    const installSeconds = (performance.now() - t0) / 1000;
    const summary = String(out['output']).trim().split('\n').pop() ?? '';
    const answer = await waitHttp(`http://127.0.0.1:${p2}/`, {
      timeoutMs: 180_000,
      accept: (a) => a.status === 200 && a.body.includes('"bench-numpy"'),
    });
    const appAnswer = JSON.parse(answer.body) as BenchPair['appAnswer'];
    if (appAnswer.token !== token) throw new Error(`the customized VM has token ${appAnswer.token}, the base ${token}`);
    const st = parseStatus((await httpGet(`http://127.0.0.1:${p1}/cgi-bin/status`, { timeoutMs: 10_000 })).body);
    if (st.marker !== 'bench-app') throw new Error(`marker is ${st.marker}`);
    if (options.dropCaches) {
      await must(
        ['console', iid, '--run', 'sync && echo 3 > /proc/sys/vm/drop_caches', '--timeout', '120s'],
        'drop caches',
        200_000,
      );
    }
    await must(
      ['snapshot', '--instance', iid, ...(options.snapshotFlags ?? []), '-o', join(work, 'custom'), '--then', 'quit'],
      'custom snapshot',
      600_000,
    );
    await must(['stop', iid], 'stop');
    // The customized disk is a qcow2 over the library's base disk: point it at the cached one.
    await exec('qemu-img', [
      'rebase',
      '-u',
      '-f',
      'qcow2',
      '-b',
      join(dir, 'base', 'disk.raw'),
      '-F',
      'raw',
      join(work, 'custom', 'disk.qcow2'),
    ]);
    await rm(root, { recursive: true, force: true });
    const m = /pkgs=(\d+) used=(\d+)/.exec(summary);
    const memoryStreamBytes = (await exec('stat', ['-c', '%s', join(work, 'custom', 'memory.stream')])).stdout.trim();
    const pair: BenchPair = {
      dir,
      base: join(dir, 'base'),
      custom: join(dir, 'custom'),
      token,
      appAnswer,
      info: {
        installSeconds: Math.round(installSeconds),
        packages: m?.[1] ?? '?',
        diskUsedKiB: Number(m?.[2] ?? 0),
        memoryStreamBytes: Number(memoryStreamBytes),
      },
    };
    await writeFile(join(work, 'pair.json'), JSON.stringify(pair, null, 2) + '\n');
    await rm(dir, { recursive: true, force: true });
    await rename(work, dir);
    log(`pair ready: ${summary}`);
    return pair;
  } catch (err) {
    await rm(work, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  } finally {
    server?.close();
  }
}
