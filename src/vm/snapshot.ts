/**
 * Capturing a running VM: its memory as a QEMU migration stream file, its disk copied while the
 * VM is stopped (so disk and memory are one consistent instant), and a record of what a resume
 * must match (machine type, RAM, CPU, the exact argv), read from the running QEMU itself.
 *
 * Order matters: `stop` (QEMU drains and flushes the disks), raise the migration bandwidth cap
 * (128 MiB/s by default), `migrate` to `exec:cat`, wait until QEMU says completed *and* cat has
 * finished writing, then copy disks, then `cont` or `quit`.
 */
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { mkdir, mkdtemp, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { setTimeout as sleep } from 'node:timers/promises';
import { syncDir, tempNameFor, writeFileAtomic } from '../util/atomic.js';
import { onCleanup } from '../util/cleanup.js';
import { NoSpaceError, QemuError, TimeoutError } from '../util/errors.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { shellQuote } from './argv.js';
import type { QmpClient } from './qmp.js';

/** What a snapshot needs of a VM: one we started (QemuVm) or one we attached to (AttachedVm). */
export interface CapturableVm {
  readonly qmp: QmpClient;
  readonly spec: VmSpec;
  readonly pid: number;
  readonly argv: string[];
  readonly exitSignal: AbortSignal;
  readonly running: boolean;
  stop(): Promise<unknown>;
}

/** What a resume must match, recorded from the source QEMU. */
export interface CaptureInfo {
  version: 1;
  createdAt: string;
  qemuVersion: string;
  /** Exact machine type, e.g. 'pc-q35-7.2'. */
  machine: string;
  memoryMiB: number;
  /** CPU model, e.g. 'qemu64'. */
  cpuModel: string;
  smp: number;
  accel: 'kvm' | 'tcg';
  /** The source's full command line (program first), from /proc when available. */
  argv: string[];
  /** The spec the source was started from; a resume reuses it with new files and ports. */
  spec: VmSpec;
  memory: { file: string; bytes: number };
  disks: Array<{ file: string; format: string; source: string }>;
}

export interface DiskCopy {
  /** The running VM's image. */
  from: string;
  /** Where the consistent copy goes (written atomically). */
  to: string;
}

export interface CaptureSnapshotOptions {
  /** Final path of the memory snapshot (migration stream). */
  memPath: string;
  /** After capture: keep running (`cont`), `quit` QEMU, or stay stopped. Default 'resume'. */
  afterCapture?: 'resume' | 'quit' | 'stop';
  /** Disk images to copy while the VM is stopped. */
  disks?: DiskCopy[];
  /** Where to write the CaptureInfo as JSON (atomically); none when omitted. */
  infoPath?: string;
  /** Migration bandwidth cap in bytes/s. Default 64 GiB/s (effectively none). */
  maxBandwidth?: number;
  /** Default 5 min. */
  timeoutMs?: number;
  /** fsync the memory file and disk copies before renaming them into place. Default true. */
  fsync?: boolean;
  /**
   * How the stream leaves QEMU: `exec` (cat into the file, the default) or `socket` (QEMU
   * connects to a unix socket we listen on and we write the file) — for a QEMU that may not
   * spawn programs (libvirt's seccomp sandbox).
   */
  via?: 'exec' | 'socket';
}

export interface CapturedSnapshot {
  memPath: string;
  memBytes: number;
  info: CaptureInfo;
  timings: { migrateMs: number; diskCopyMs: number; totalMs: number };
}

/** Captures memory (+ disks) of a running VM; see the module comment for the order. */
export async function captureSnapshot(vm: CapturableVm, options: CaptureSnapshotOptions): Promise<CapturedSnapshot> {
  const t0 = performance.now();
  const qmp = vm.qmp;
  const infoBase = await readCaptureInfo(vm);

  await qmp.execute('migrate-set-parameters', { 'max-bandwidth': options.maxBandwidth ?? 64 * 2 ** 30 });
  await qmp.execute('stop');
  try {
    return await captureStopped(vm, options, infoBase, t0);
  } catch (err) {
    // Leave the VM as the caller expects it: running again when it asked for 'resume'.
    if ((options.afterCapture ?? 'resume') === 'resume' && vm.running) {
      await qmp.execute('cont').catch(() => undefined);
    }
    throw err;
  }
}

async function captureStopped(
  vm: CapturableVm,
  options: CaptureSnapshotOptions,
  infoBase: Omit<CaptureInfo, 'memory' | 'disks'>,
  t0: number,
): Promise<CapturedSnapshot> {
  const qmp = vm.qmp;
  const timeoutMs = options.timeoutMs ?? 300_000;
  const fsync = options.fsync ?? true;

  // QEMU reports 'completed' before its exec child has necessarily written everything, and on
  // failure cat still sees a clean EOF: so cat renames its output to a second temporary name
  // only on success, and we accept the file only when both QEMU and cat are done.
  const temp = tempNameFor(options.memPath);
  const written = `${temp}.written`;
  const unregister = onCleanup(async () => {
    await rm(temp, { force: true });
    await rm(written, { force: true });
  });
  let memBytes = 0;
  const m0 = performance.now();
  try {
    if (options.via === 'socket') {
      await migrateToSocket(vm, temp, timeoutMs);
      await rename(temp, written);
    } else {
      await qmp.execute('migrate', {
        uri: `exec:cat > ${shellQuote(temp)} && mv -f ${shellQuote(temp)} ${shellQuote(written)}`,
      });
      await waitMigration(vm, timeoutMs);
      await waitForFile(written, vm, 30_000);
    }
    if (fsync) await fsyncFile(written);
    await rename(written, options.memPath);
    if (fsync) await syncDir(dirname(options.memPath));
    memBytes = (await stat(options.memPath)).size;
  } finally {
    await rm(temp, { force: true });
    await rm(written, { force: true });
    unregister();
  }
  const migrateMs = performance.now() - m0;

  // The VM is stopped and QEMU flushed its disks on stop: a copy now matches the memory.
  const d0 = performance.now();
  for (const d of options.disks ?? []) await copyDiskWhileStopped(vm, d.from, d.to, { fsync });
  const diskCopyMs = performance.now() - d0;

  const info: CaptureInfo = {
    ...infoBase,
    memory: { file: basename(options.memPath), bytes: memBytes },
    disks: (options.disks ?? []).map((d) => ({
      file: basename(d.to),
      format: vm.spec.drives?.find((x) => x.file === d.from)?.format ?? 'raw',
      source: d.from,
    })),
  };
  if (options.infoPath) await writeFileAtomic(options.infoPath, JSON.stringify(info, null, 2) + '\n');

  const after = options.afterCapture ?? 'resume';
  if (after === 'resume') await qmp.execute('cont');
  else if (after === 'quit') await vm.stop();
  return {
    memPath: options.memPath,
    memBytes,
    info,
    timings: { migrateMs, diskCopyMs, totalMs: performance.now() - t0 },
  };
}

/**
 * Copies a disk image of a *stopped* VM to `to` (sparse; atomically: temp name, then rename).
 * Refuses while the VM runs: a copy of a live disk is not consistent with anything.
 */
export async function copyDiskWhileStopped(
  vm: CapturableVm,
  from: string,
  to: string,
  options: { fsync?: boolean } = {},
): Promise<void> {
  if (vm.running) {
    const { status } = await vm.qmp.execute<{ status: string }>('query-status');
    if (status === 'running') {
      throw new QemuError(`refusing to copy ${from} while the VM is running (stop it first)`, { path: from });
    }
  }
  await copySparse(from, to, options);
}

/** cp --sparse=always into a temporary name next to `to` (directory created), fsync, rename. */
export async function copySparse(from: string, to: string, options: { fsync?: boolean } = {}): Promise<void> {
  await mkdir(dirname(to), { recursive: true });
  const temp = tempNameFor(to);
  const unregister = onCleanup(() => rm(temp, { force: true }));
  try {
    await runTool('cp', ['--sparse=always', '--reflink=auto', '--', from, temp]);
    if (options.fsync ?? true) await fsyncFile(temp);
    await rename(temp, to);
    if (options.fsync ?? true) await syncDir(dirname(to));
  } finally {
    await rm(temp, { force: true });
    unregister();
  }
}

/** Reads machine, RAM, CPU and argv from the running QEMU (not from what we think we started). */
export async function readCaptureInfo(vm: CapturableVm): Promise<Omit<CaptureInfo, 'memory' | 'disks'>> {
  const qmp = vm.qmp;
  const version = await qmp.execute<{ qemu: { major: number; minor: number; micro: number }; package: string }>(
    'query-version',
  );
  const machineType = await qmp.execute<string>('qom-get', { path: '/machine', property: 'type' });
  const mem = await qmp.execute<{ 'base-memory': number }>('query-memory-size-summary');
  const cpus = await qmp.execute<Array<{ 'qom-path': string }>>('query-cpus-fast');
  const first = cpus[0];
  let cpuModel = vm.spec.cpu ?? 'qemu64';
  if (first) {
    const type = await qmp.execute<string>('qom-get', { path: first['qom-path'], property: 'type' });
    cpuModel = type.replace(/-x86_64-cpu$/, '');
  }
  const kvm = await qmp.execute<{ enabled: boolean }>('query-kvm');
  let argv = vm.argv;
  try {
    const raw = await readFile(`/proc/${vm.pid}/cmdline`, 'utf8');
    const parts = raw.split('\0');
    if (parts[parts.length - 1] === '') parts.pop();
    if (parts.length > 0) argv = parts;
  } catch {
    // not Linux, or already gone: keep what we started
  }
  return {
    version: 1,
    createdAt: new Date().toISOString(),
    qemuVersion: `${version.qemu.major}.${version.qemu.minor}.${version.qemu.micro}`,
    machine: machineType.replace(/-machine$/, ''),
    memoryMiB: Math.round(mem['base-memory'] / 2 ** 20),
    cpuModel,
    smp: cpus.length,
    accel: kvm.enabled ? 'kvm' : 'tcg',
    argv,
    spec: vm.spec,
  };
}

/** migrate to a unix socket we listen on; resolves once QEMU completed and the file is whole. */
async function migrateToSocket(vm: CapturableVm, file: string, timeoutMs: number): Promise<void> {
  const dir = await mkdtemp(join(tmpdir(), 'cs-'));
  const sock = join(dir, 'migrate.sock');
  const server = createServer();
  try {
    const received = new Promise<void>((resolvePromise, reject) => {
      server.once('connection', (conn) => {
        server.close();
        pipeline(conn, createWriteStream(file)).then(resolvePromise, reject);
      });
      server.once('error', reject);
    });
    received.catch(() => undefined);
    await new Promise<void>((r) => server.listen(sock, r));
    await vm.qmp.execute('migrate', { uri: `unix:${sock}` });
    await waitMigration(vm, timeoutMs);
    await received;
  } finally {
    server.close();
    await rm(dir, { recursive: true, force: true });
  }
}

interface MigrateInfo {
  status?: string;
  'error-desc'?: string;
  ram?: { transferred?: number; total?: number };
}

async function waitMigration(vm: CapturableVm, timeoutMs: number): Promise<MigrateInfo> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    vm.exitSignal.throwIfAborted();
    const info = await vm.qmp.execute<MigrateInfo>('query-migrate');
    switch (info.status) {
      case 'completed':
        return info;
      case 'failed':
      case 'cancelled':
        throw new QemuError(`memory snapshot failed: ${info['error-desc'] ?? info.status}`, {
          migrationStatus: info.status,
        });
      default:
        break;
    }
    if (Date.now() > deadline) {
      await vm.qmp.execute('migrate_cancel').catch(() => undefined);
      throw new TimeoutError(`memory snapshot did not complete within ${timeoutMs} ms`, {
        migrationStatus: info.status ?? 'none',
        transferred: info.ram?.transferred ?? 0,
      });
    }
    await sleep(20);
  }
}

async function waitForFile(path: string, vm: CapturableVm, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    try {
      await stat(path);
      return;
    } catch {
      // not yet
    }
    vm.exitSignal.throwIfAborted();
    if (Date.now() > deadline) {
      throw new TimeoutError(`the migration writer did not finish ${path} within ${timeoutMs} ms`, { path });
    }
    await sleep(10);
  }
}

async function fsyncFile(path: string): Promise<void> {
  const h = await open(path, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

function runTool(program: string, args: string[]): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let stderr = '';
    const child = spawn(program, args, { stdio: ['ignore', 'ignore', 'pipe'] });
    child.stderr.setEncoding('utf8');
    child.stderr.on('data', (d: string) => {
      stderr += d;
    });
    child.on('error', reject);
    child.on('close', (code) => {
      if (code === 0) resolve();
      else if (/No space left on device|Disk quota exceeded/.test(stderr)) {
        const dest = args[args.length - 1] ?? '';
        reject(new NoSpaceError(`no space left on the device holding ${dest}`, { path: dest }));
      } else {
        reject(new QemuError(`${program} ${args.join(' ')} failed (status ${code}): ${stderr.trim()}`, { program }));
      }
    });
  });
}
