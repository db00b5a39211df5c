/**
 * The demo base VM for tests and the demo: build it (scripts/demo-vm/build.sh, cached), boot
 * it, resume it from a memory snapshot, "install an application" through its serial console,
 * and run the whole capture flow of DESIGN.md: boot base → snapshot → resume base snapshot →
 * customize → snapshot. Everything runs real QEMU; callers give a work directory and get paths.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import { createServer } from 'node:net';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BusyError } from '../../src/util/errors.js';
import { SerialConsole } from '../../src/vm/console.js';
import { resumeSpec, type VmSpec } from '../../src/spec/vm-spec.js';
import { startQemu, type QemuVm } from '../../src/vm/process.js';
import { httpGet, waitHttp } from '../../src/vm/ready.js';
import { captureSnapshot, copySparse, type CapturedSnapshot, type CaptureInfo } from '../../src/vm/snapshot.js';
import { cli, ok } from './cli.js';

/** demo-vm.json as written by build.sh. */
export interface DemoVm {
  dir: string;
  kernel: string;
  initrd: string;
  disk: string;
  diskFormat: 'raw';
  append: string;
  machine: string;
  memoryMiB: number;
  cpu: string;
  smp: number;
  guestPort: number;
  qemuArgs: string[];
  kernelPackage: string;
  kernelPackageVersion: string;
  buildKey: string;
}

/** A running demo VM with its HTTP endpoint. */
export interface RunningDemoVm {
  vm: QemuVm;
  port: number;
  /** http://127.0.0.1:PORT/cgi-bin/status */
  statusUrl: string;
  runDir: string;
  /** The disk image this VM writes to. */
  disk: string;
  /** QEMU spawn → first HTTP answer, ms. */
  readyMs: number;
}

/** One parsed /cgi-bin/status answer. */
export interface DemoStatus {
  token: string;
  counter: number;
  marker: string;
  app: string;
  uptime: number;
}

export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('cannot find the repository root (package.json)');
    dir = up;
  }
  return dir;
}

let built: Promise<DemoVm> | null = null;

/** Builds the demo VM if needed (≈1 s when cached) and returns demo-vm.json. Once per process. */
export function ensureDemoVm(): Promise<DemoVm> {
  built ??= (async () => {
    const script = join(repoRoot(), 'scripts', 'demo-vm', 'build.sh');
    const dir = await new Promise<string>((resolve, reject) => {
      execFile('bash', [script], { maxBuffer: 16 << 20 }, (err, _stdout, stderr) => {
        if (err) reject(new Error(`demo VM build failed: ${err.message}\n${stderr.slice(-4000)}`));
        else resolve('');
      });
    }).then(
      () =>
        new Promise<string>((resolve, reject) =>
          execFile('bash', [script, '--print-dir'], (err, stdout) => {
            if (err) reject(new Error(`demo VM build --print-dir failed: ${err.message}`, { cause: err }));
            else resolve(stdout.trim());
          }),
        ),
    );
    return JSON.parse(await readFile(join(dir, 'demo-vm.json'), 'utf8')) as DemoVm;
  })();
  built.catch(() => {
    built = null;
  });
  return built;
}

/** A free TCP port on 127.0.0.1 (listen(0) probe; QEMU binds it moments later). */
export function freePort(): Promise<number> {
  return new Promise<number>((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      srv.close(() => {
        if (addr && typeof addr === 'object') resolve(addr.port);
        else reject(new Error('no port'));
      });
    });
  });
}

/** The VmSpec that boots the demo VM with `disk` and the guest's :8080 on host `port`. */
export function demoVmSpec(demo: DemoVm, disk: string, port: number): VmSpec {
  return {
    machine: demo.machine,
    memoryMiB: demo.memoryMiB,
    cpu: demo.cpu,
    smp: demo.smp,
    kernel: demo.kernel,
    initrd: demo.initrd,
    append: demo.append,
    drives: [{ file: disk, format: 'raw', if: 'virtio' }],
    network: { model: 'virtio-net-pci', romfile: '', forwards: [{ hostPort: port, guestPort: demo.guestPort }] },
    name: 'cloudlet-demo',
  };
}

export function statusUrl(port: number): string {
  return `http://127.0.0.1:${port}/cgi-bin/status`;
}

/** Parses the key=value lines of /cgi-bin/status. */
export function parseStatus(body: string): DemoStatus {
  const kv = new Map<string, string>();
  for (const line of body.split('\n')) {
    const i = line.indexOf('=');
    if (i > 0) kv.set(line.slice(0, i).trim(), line.slice(i + 1).trim());
  }
  return {
    token: kv.get('token') ?? '',
    counter: Number(kv.get('counter') ?? NaN),
    marker: kv.get('marker') ?? '',
    app: kv.get('app') ?? '',
    uptime: Number(kv.get('uptime') ?? NaN),
  };
}

export async function getStatus(vm: RunningDemoVm): Promise<DemoStatus> {
  const answer = await httpGet(vm.statusUrl, { timeoutMs: 10_000 });
  if (answer.status !== 200) throw new Error(`status page answered HTTP ${answer.status}`);
  return parseStatus(answer.body);
}

const isStatusPage = (a: { status: number; body: string }): boolean =>
  a.status === 200 && /^token=[0-9a-f]+$/m.test(a.body);

/** Starts `spec` (port picked when not given, retried if taken) and waits for a real HTTP answer. */
async function startAndWait(
  makeSpec: (port: number) => VmSpec,
  runDir: string,
  disk: string,
  port: number | undefined,
  timeoutMs: number,
): Promise<RunningDemoVm> {
  await mkdir(runDir, { recursive: true });
  for (let attempt = 0; ; attempt++) {
    const p = port ?? (await freePort());
    let vm: QemuVm;
    try {
      vm = await startQemu(makeSpec(p), { runDir, accel: 'auto' });
    } catch (err) {
      if (err instanceof BusyError && port === undefined && attempt < 3) continue;
      throw err;
    }
    try {
      await waitHttp(statusUrl(p), { timeoutMs, signal: vm.exitSignal, accept: isStatusPage });
    } catch (err) {
      await vm.stop({ graceMs: 1000 });
      // What the guest said is the best clue (panic, missing module, failed mount).
      const serial = await readFile(vm.paths.serialLog, 'utf8').catch(() => '');
      const stderr = await vm.stderrTail(5);
      throw new Error(
        `demo VM never answered HTTP: ${(err as Error).message}\n` +
          `--- serial (end) ---\n${serial.slice(-1500)}\n--- qemu stderr ---\n${stderr}`,
        { cause: err },
      );
    }
    return { vm, port: p, statusUrl: statusUrl(p), runDir, disk, readyMs: performance.now() - vm.startedAt };
  }
}

/**
 * Boots the demo VM from its kernel/initrd with a private copy of the base disk (or `disk`,
 * used in place) and waits for HTTP.
 */
export async function bootDemoVm(options: {
  workDir: string;
  port?: number;
  disk?: string;
  timeoutMs?: number;
}): Promise<RunningDemoVm> {
  const demo = await ensureDemoVm();
  await mkdir(options.workDir, { recursive: true });
  let disk = options.disk;
  if (!disk) {
    disk = join(options.workDir, 'disk.raw');
    await copySparse(demo.disk, disk, { fsync: false });
  }
  const d = disk;
  return startAndWait((p) => demoVmSpec(demo, d, p), options.workDir, d, options.port, options.timeoutMs ?? 90_000);
}

/**
 * Resumes a snapshot: `incoming` is the memory file, `disk` the disk image that matches it
 * (used in place: pass a copy), `spec` the source's spec (default: the demo VM's).
 */
export async function resumeVm(options: {
  workDir: string;
  incoming: string;
  disk: string;
  port?: number;
  spec?: VmSpec;
  timeoutMs?: number;
}): Promise<RunningDemoVm> {
  const demo = await ensureDemoVm();
  const source = options.spec ?? demoVmSpec(demo, options.disk, 1);
  return startAndWait(
    (p) =>
      resumeSpec(source, {
        incoming: { from: 'file', path: options.incoming },
        driveFiles: [options.disk],
        forwards: [{ hostPort: p, guestPort: demo.guestPort }],
      }),
    options.workDir,
    options.disk,
    options.port,
    options.timeoutMs ?? 60_000,
  );
}

export interface Customization {
  marker: string;
  appId: string;
  /** Bytes written to the disk by the "install". */
  bytesWritten: number;
}

/**
 * "Installs an application" through the serial console: a new /mnt/marker, ~4 MB of files in
 * /mnt/app (random data, a copy of busybox — also in RAM —, text), and a background process
 * that keeps /tmp/app-state current; then sync. Waits until the status page shows it all.
 */
export async function customize(
  vm: RunningDemoVm,
  options: { marker?: string; appId?: string; timeoutMs?: number } = {},
): Promise<Customization> {
  const marker = options.marker ?? `custom-${Date.now().toString(36)}`;
  const appId = options.appId ?? 'demo-app-v1';
  const timeoutMs = options.timeoutMs ?? 60_000;
  const con = await SerialConsole.connect(vm.vm.paths.serialSocket);
  try {
    await con.ready({ timeoutMs: 20_000 });
    const steps = [
      `echo '${marker}' > /mnt/marker`,
      'mkdir -p /mnt/app',
      'dd if=/dev/urandom of=/mnt/app/random.bin bs=64k count=32 2>/dev/null',
      'cp /bin/busybox /mnt/app/busybox.copy',
      'seq 1 120000 > /mnt/app/numbers.txt',
      `printf '%s\\n' 'n=0' 'while :; do n=$((n+1)); echo "$1 ticks=$n" > /tmp/app-state.new; ` +
        `mv /tmp/app-state.new /tmp/app-state; sleep 1; done' > /mnt/app/run.sh`,
      `setsid sh /mnt/app/run.sh '${appId}' </dev/null >/dev/null 2>&1 &`,
      'sync',
    ];
    for (const step of steps) {
      const r = await con.run(step, { timeoutMs });
      if (r.status !== 0) throw new Error(`guest command failed (status ${r.status}): ${step}\n${r.output}`);
    }
    const size = await con.run('du -sk /mnt/app | cut -f1', { timeoutMs });
    await waitHttp(vm.statusUrl, {
      timeoutMs,
      signal: vm.vm.exitSignal,
      accept: (a) => {
        if (!isStatusPage(a)) return false;
        const s = parseStatus(a.body);
        return s.marker === marker && s.app.startsWith(`${appId} ticks=`);
      },
    });
    // The interactive shell may print job notices ("[1] 123") first: take the last line.
    const kib = Number(size.output.trim().split('\n').pop()?.trim() ?? NaN);
    return { marker, appId, bytesWritten: Number.isFinite(kib) ? kib * 1024 : 0 };
  } finally {
    await con.close();
  }
}

export interface CapturedVm {
  mem: string;
  disk: string;
  infoPath: string;
  info: CaptureInfo;
}

export interface CaptureResult {
  base: CapturedVm;
  custom: CapturedVm;
  customization: Customization;
  /** Boot token of the base boot, and as seen after resuming the base snapshot. */
  tokens: { base: string; resumed: string };
  statuses: { base: DemoStatus; resumed: DemoStatus; custom: DemoStatus };
  timings: {
    bootToHttpMs: number;
    baseSnapshotMs: number;
    resumeToHttpMs: number;
    customizeMs: number;
    customSnapshotMs: number;
  };
}

/**
 * DESIGN.md's capture flow: boot base → HTTP → snapshot (base.mem + base.disk.raw, quit) →
 * resume base.mem with a fresh copy of base.disk.raw → customize → snapshot (custom.mem +
 * custom.disk.raw, quit). All files land in workDir.
 */
export async function captureBaseAndCustomized(workDir: string): Promise<CaptureResult> {
  await mkdir(workDir, { recursive: true });
  const base = await bootDemoVm({ workDir: join(workDir, 'base-run') });
  let baseStatus: DemoStatus;
  let baseSnap: CapturedSnapshot;
  try {
    baseStatus = await getStatus(base);
    baseSnap = await captureSnapshot(base.vm, {
      memPath: join(workDir, 'base.mem'),
      disks: [{ from: base.disk, to: join(workDir, 'base.disk.raw') }],
      infoPath: join(workDir, 'base.json'),
      afterCapture: 'quit',
    });
  } finally {
    await base.vm.stop();
  }

  const customRun = join(workDir, 'custom-run');
  await mkdir(customRun, { recursive: true });
  const customDisk = join(customRun, 'disk.raw');
  await copySparse(join(workDir, 'base.disk.raw'), customDisk, { fsync: false });
  const resumed = await resumeVm({
    workDir: customRun,
    incoming: baseSnap.memPath,
    disk: customDisk,
    spec: baseSnap.info.spec,
  });
  try {
    const resumedStatus = await getStatus(resumed);
    const c0 = performance.now();
    const customization = await customize(resumed);
    const customizeMs = performance.now() - c0;
    const customStatus = await getStatus(resumed);
    const customSnap = await captureSnapshot(resumed.vm, {
      memPath: join(workDir, 'custom.mem'),
      disks: [{ from: customDisk, to: join(workDir, 'custom.disk.raw') }],
      infoPath: join(workDir, 'custom.json'),
      afterCapture: 'quit',
    });
    return {
      base: {
        mem: baseSnap.memPath,
        disk: join(workDir, 'base.disk.raw'),
        infoPath: join(workDir, 'base.json'),
        info: baseSnap.info,
      },
      custom: {
        mem: customSnap.memPath,
        disk: join(workDir, 'custom.disk.raw'),
        infoPath: join(workDir, 'custom.json'),
        info: customSnap.info,
      },
      customization,
      tokens: { base: baseStatus.token, resumed: resumedStatus.token },
      statuses: { base: baseStatus, resumed: resumedStatus, custom: customStatus },
      timings: {
        bootToHttpMs: base.readyMs,
        baseSnapshotMs: baseSnap.timings.totalMs,
        resumeToHttpMs: resumed.readyMs,
        customizeMs,
        customSnapshotMs: customSnap.timings.totalMs,
      },
    };
  } finally {
    await resumed.vm.stop();
  }
}

/**
 * Boots the demo VM and captures it into the library `env` names as base `name` through the CLI
 * (`base capture --qmp`); the boot's status page (its token) and the base id.
 */
export async function captureDemoBase(
  env: NodeJS.ProcessEnv,
  workDir: string,
  name = 'demo',
): Promise<{ id: string; status: DemoStatus }> {
  const booted = await bootDemoVm({ workDir });
  try {
    const status = parseStatus(await (await fetch(booted.statusUrl)).text());
    await booted.vm.qmp.close(); // QEMU serves one QMP client per socket: leave it to the CLI
    const cap = ok(
      await cli(['base', 'capture', '--qmp', booted.vm.paths.qmpSocket, '--name', name, '--then', 'quit'], env),
      'base capture',
    );
    await booted.vm.waitExit(10_000);
    return { id: String(cap.id), status };
  } finally {
    await booted.vm.stop();
  }
}
