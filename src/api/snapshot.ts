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
}

export interface SnapshotResult {
  message_type: 'snapshot';
  dir: string;
  memory_bytes: number;
  disk?: string;
  timings_ms: { migrate: number; disk_copy: number; total: number };
}

export async function snapshotVm(opts: SnapshotOptions): Promise<SnapshotResult> {
  const progress = opts.progress ?? silent;
  if (!!opts.instance === !!opts.qmp) throw new UsageError('name the VM: --instance ID or --qmp SOCKET');
  let spec: VmSpec | undefined;
  let socket = opts.qmp ? resolve(opts.qmp) : undefined;
  let launcher: string | undefined;
  if (opts.instance) {
    const inst = await findInstance(opts.root, opts.instance);
    spec = inst.spec;
    socket = inst.qmp_socket;
    launcher = inst.launcher;
  } else {
    const ours = (await listInstances(opts.root)).find((i) => i.qmp_socket === socket);
    spec = ours?.spec;
    launcher = ours?.launcher;
  }
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
  try {
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
      timings_ms: {
        migrate: Math.round(r.timings.migrateMs),
        disk_copy: Math.round(r.timings.diskCopyMs),
        total: Math.round(r.timings.totalMs),
      },
    };
  } catch (err) {
    progress.fail('snapshot failed');
    await rm(work, { recursive: true, force: true });
    throw err;
  } finally {
    unregister();
    if (vm.running) await vm.detach();
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
