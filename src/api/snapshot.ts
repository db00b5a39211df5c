/**
 * snapshot: capture a running VM (an instance of ours, or any QEMU with a QMP socket) into a
 * snapshot directory — memory.stream, a consistent copy of its disk, vm.json (the spec a
 * resume must match, read from the running QEMU) — that `base import` and `create` take.
 * The directory appears atomically.
 */
import { mkdir, rename, rm, stat } from 'node:fs/promises';
import { readInputFile } from '../util/input-file.js';
import { basename, dirname, join, resolve } from 'node:path';
import { AttachedVm } from '../vm/attach.js';
import { captureSnapshot } from '../vm/snapshot.js';
import { prepareGuest, type GuestPrepOptions, type GuestPrepReport, type PreparedGuest } from '../vm/guest-prep.js';
import { openDisk } from '../image/disk/open-disk.js';
import { freeSpace } from '../image/fs/free-space.js';
import { summarizeFileSystems, type FileSystemSummary } from './create.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { listInstances } from '../instance/state.js';
import { stagingDir, writeFileAtomic, syncDir } from '../util/atomic.js';
import { BusyError, CorruptInputError, NotFoundError, UsageError } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { silent, type Progress } from '../util/progress.js';
import { findInstance } from './instance.js';
import { parseSpec, withoutHostSide } from '../spec/validate.js';

export const SNAPSHOT_MEMORY = 'memory.stream';
export const SNAPSHOT_VM = 'vm.json';

export interface SnapshotVmFile {
  vm: VmSpec;
  disk?: { file: string; format: 'raw' | 'qcow2' };
  qemu_version?: string;
  captured_at: string;
  /** The source QEMU's full command line. */
  argv: string[];
}

export interface SnapshotOptions {
  root: string;
  /** One of: an instance id, or a QMP socket. */
  instance?: string;
  qmp?: string;
  /** The disk image to copy (default: the VM's first drive). */
  disk?: string;
  outDir: string;
  /** What the VM does after the capture (--then). */
  afterCapture: 'resume' | 'quit' | 'stop';
  progress?: Progress;
  /**
   * Refuse (before anything is captured) a VM whose spec could not become a base: options the
   * closed list does not model (spec/validate.ts). `base capture` sets it.
   */
  requireStorable?: boolean;
  /** Before the capture: drop the page cache, zero free memory, trim, freeze (vm/guest-prep.ts). */
  guest?: GuestPrepOptions;
  /** The guest agent's socket of a VM that is not ours (ours: from its instance state). */
  agentSocket?: string;
  /** The serial console socket of a VM that is not ours. */
  serialSocket?: string;
}

export interface SnapshotResult {
  message_type: 'snapshot';
  dir: string;
  memory_bytes: number;
  disk?: string;
  /** What was done in the guest first (--drop-caches, --zero-free-memory, --trim, --freeze). */
  guest?: GuestPrepReport & {
    /** Agent freezes: thawed again after the capture (the VM went on running). */
    thawed?: number;
    /** Why that thaw failed (the guest may still be frozen); the snapshot is kept. */
    thaw_error?: string;
  };
  /** With --freeze: the file systems of the disk copy, and whether create can trust them. */
  file_systems?: FileSystemSummary[];
  timings_ms: { migrate: number; disk_copy: number; total: number; [step: string]: number };
}

export async function snapshotVm(opts: SnapshotOptions): Promise<SnapshotResult> {
  const progress = opts.progress ?? silent;
  if (!!opts.instance === !!opts.qmp) throw new UsageError('name the VM: --instance ID or --qmp SOCKET');
  let spec: VmSpec | undefined;
  let socket = opts.qmp ? resolve(opts.qmp) : undefined;
  let launcher: string | undefined;
  let agentSocket = opts.agentSocket;
  let serialSocket = opts.serialSocket;
  if (opts.instance) {
    const inst = await findInstance(opts.root, opts.instance);
    spec = inst.spec;
    socket = inst.qmp_socket;
    launcher = inst.launcher;
    agentSocket ??= inst.agent_socket;
    serialSocket ??= inst.serial_socket;
  } else {
    const ours = (await listInstances(opts.root)).find((i) => i.qmp_socket === socket);
    spec = ours?.spec;
    launcher = ours?.launcher;
    agentSocket ??= ours?.agent_socket;
    serialSocket ??= ours?.serial_socket;
  }
  const g = opts.guest ?? {};
  const prep = g.dropCaches || g.zeroFreeMemory || g.trim || g.freeze;
  const outDir = resolve(opts.outDir);
  if (await stat(outDir).catch(() => undefined)) throw new BusyError(`${outDir} already exists`, { path: outDir });
  if (!socket) throw new UsageError('name the VM: --instance ID or --qmp SOCKET');
  const vm = await AttachedVm.attach(socket, spec);
  if (opts.requireStorable) {
    try {
      parseSpec(withoutHostSide(vm.spec), 'input');
    } catch (err) {
      await vm.detach();
      throw err;
    }
  }
  await mkdir(dirname(outDir), { recursive: true });
  const work = await stagingDir(dirname(outDir), `${basename(outDir)}.tmp-`);
  const unregister = onCleanup(() => rm(work, { recursive: true, force: true }));
  let prepared: PreparedGuest | undefined;
  try {
    if (prep) {
      progress.step('preparing the guest');
      prepared = await prepareGuest({ agentSocket, serialSocket }, g);
      progress.done(`guest prepared (${prepared.report.channel})`);
    }
    const vmSpec: VmSpec = { ...vm.spec };
    delete vmSpec.incoming;
    delete vmSpec.memoryBackendFile;
    const diskFrom = opts.disk ? resolve(opts.disk) : vmSpec.drives?.[0]?.file;
    const diskFormat = vmSpec.drives?.find((d) => d.file === diskFrom)?.format ?? vmSpec.drives?.[0]?.format ?? 'raw';
    const diskFile = diskFrom ? `disk.${diskFormat}` : undefined;
    await mkdir(work, { recursive: true });
    progress.step('capturing memory and disk');
    const r = await captureSnapshot(vm, {
      memPath: join(work, SNAPSHOT_MEMORY),
      disks: diskFrom && diskFile ? [{ from: diskFrom, to: join(work, diskFile) }] : [],
      afterCapture: opts.afterCapture,
      // libvirt's sandbox lets QEMU spawn nothing: no exec: migration there.
      via: launcher === 'libvirt' ? 'socket' : 'exec',
    });
    progress.done(`captured ${Math.round(r.memBytes / 2 ** 20)} MiB of memory stream`);
    let guest: SnapshotResult['guest'];
    if (prepared) {
      guest = { ...prepared.report };
      // An agent-frozen guest that goes on running is thawed now (a console freeze thaws itself).
      // The capture is good whatever the thaw does: a failure is reported, not a lost snapshot.
      if (opts.afterCapture === 'resume') {
        const report = guest;
        progress.step('thawing the guest');
        report.thawed = await prepared.thaw().then(
          (n) => {
            progress.done(n > 0 ? `thawed ${n} file systems` : 'nothing to thaw');
            return n;
          },
          (err: unknown) => {
            report.thaw_error = err instanceof Error ? err.message : String(err);
            progress.fail(`the guest could not be thawed (it may still be frozen): ${report.thaw_error}`);
            return 0;
          },
        );
      }
    }
    let fileSystems: FileSystemSummary[] | undefined;
    if (g.freeze && diskFile) {
      // Only advice for create --free-blocks (which judges the disk again itself).
      fileSystems = await fileSystemsOf(join(work, diskFile), diskFormat).catch(() => undefined);
    }
    const file: SnapshotVmFile = {
      vm: vmSpec,
      disk: diskFile ? { file: diskFile, format: diskFormat } : undefined,
      qemu_version: r.info.qemuVersion,
      captured_at: new Date().toISOString(),
      argv: r.info.argv,
    };
    await writeFileAtomic(join(work, SNAPSHOT_VM), JSON.stringify(file, null, 2) + '\n');
    await rename(work, outDir);
    await syncDir(resolve(outDir, '..'));
    return {
      message_type: 'snapshot',
      dir: outDir,
      memory_bytes: r.memBytes,
      disk: diskFile ? join(outDir, diskFile) : undefined,
      ...(guest ? { guest } : {}),
      ...(fileSystems ? { file_systems: fileSystems } : {}),
      timings_ms: {
        ...prepared?.report.timings_ms,
        migrate: Math.round(r.timings.migrateMs),
        disk_copy: Math.round(r.timings.diskCopyMs),
        total: Math.round(r.timings.totalMs),
      },
    };
  } catch (err) {
    progress.fail('snapshot failed');
    // Never leave a guest frozen by us running.
    await prepared?.thaw().catch(() => undefined);
    await rm(work, { recursive: true, force: true });
    throw err;
  } finally {
    unregister();
    await prepared?.close();
    if (vm.running) await vm.detach();
  }
}

/** The file systems of a disk image, as `create --free-blocks` judges them. */
async function fileSystemsOf(path: string, format: string): Promise<FileSystemSummary[]> {
  const disk = await openDisk(path, { format });
  try {
    return summarizeFileSystems(await freeSpace(disk));
  } finally {
    await disk.close();
  }
}

/** What a snapshot directory holds, as `base import` and `create` take it. */
export interface SnapshotDir {
  disk?: string;
  diskFormat?: string;
  memory: string;
  vm: VmSpec;
  qemuVersion?: string;
}

/** Reads a snapshot directory written by snapshotVm (its vm.json names the files). */
export async function readSnapshotDir(dir: string): Promise<SnapshotDir> {
  let parsed: SnapshotVmFile;
  try {
    parsed = JSON.parse(
      (await readInputFile(join(dir, SNAPSHOT_VM), 1 << 20, SNAPSHOT_VM)).toString('utf8'),
    ) as SnapshotVmFile;
  } catch {
    throw new NotFoundError(`${dir} is not a snapshot directory (no readable ${SNAPSHOT_VM})`, { path: dir });
  }
  if (typeof parsed.vm?.machine !== 'string') throw new CorruptInputError(`${join(dir, SNAPSHOT_VM)}: no VM spec`);
  return {
    disk: parsed.disk ? join(dir, parsed.disk.file) : undefined,
    diskFormat: parsed.disk?.format,
    memory: join(dir, SNAPSHOT_MEMORY),
    vm: parsed.vm,
    qemuVersion: parsed.qemu_version,
  };
}
