/**
 * The base library as the CLI uses it: import (from a snapshot directory, a package, or
 * files), capture (snapshot a running VM straight into the library), list, show, remove
 * (refused while a running instance uses the base), export, verify. Bases are named by id,
 * unique id prefix or name; every result is one message object.
 */
import { mkdir, readFile, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { importBase, type ImportResult } from '../base/import.js';
import {
  exportBase as exportLibraryBase,
  importPackage,
  listBases as listLibraryBases,
  removeBase as removeLibraryBase,
  resolveBaseId,
  showBase as showLibraryBase,
  verifyBase as verifyLibraryBase,
  type BaseSummary,
  type BaseVerifyResult,
} from '../base/library.js';
import type { BaseManifest } from '../base/manifest.js';
import { tmpDir } from '../base/paths.js';
import { listInstances } from '../instance/state.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { BusyError, NotFoundError, UsageError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';
import { readSnapshotDir, snapshotVm, type SnapshotVmFile } from './snapshot.js';

export { libraryRoot } from '../base/paths.js';

export interface BaseImportOptions {
  root: string;
  /** A snapshot directory (from `snapshot`) or a package (from `base export`); or the files below. */
  input?: string;
  disk?: string;
  diskFormat?: string;
  memory?: string;
  /** A VM spec JSON file: a snapshot directory's vm.json, or a bare VmSpec. */
  vmFile?: string;
  name?: string;
  progress?: Progress;
}

export interface BaseImportMessage {
  message_type: 'base_import';
  id: string;
  /** False when the library already held this base (nothing was added). */
  added: boolean;
  dir?: string;
  manifest?: BaseManifest;
}

export async function importBaseFrom(opts: BaseImportOptions): Promise<BaseImportMessage> {
  const progress = opts.progress ?? silent;
  const root = opts.root;
  if (opts.input) {
    const input = opts.input;
    if (opts.disk || opts.memory || opts.vmFile)
      throw new UsageError('give a source or --disk/--memory/--vm, not both');
    const st = await stat(input).catch(() => {
      throw new NotFoundError(`${input} does not exist`, { path: input });
    });
    if (st.isFile()) return { message_type: 'base_import', ...(await importPackage(root, input, progress)) };
    return importSnapshotDir(root, input, opts.name, progress);
  }
  let vm: VmSpec | undefined;
  if (opts.vmFile) {
    const parsed = JSON.parse(await readFile(opts.vmFile, 'utf8')) as SnapshotVmFile | VmSpec;
    vm = 'vm' in parsed ? parsed.vm : parsed;
  }
  const { disk, diskFormat, memory, name } = opts;
  return importBase({ root, disk, diskFormat, memory, vm, name, progress });
}

async function importSnapshotDir(
  root: string,
  dir: string,
  name: string | undefined,
  progress: Progress,
): Promise<ImportResult> {
  const snap = await readSnapshotDir(dir);
  const { disk, diskFormat, memory, vm, qemuVersion } = snap;
  return importBase({ root, disk, diskFormat, memory, vm, name, qemuVersion, progress });
}

export interface CaptureBaseOptions {
  root: string;
  /** One of: an instance id, or a QMP socket. */
  instance?: string;
  qmp?: string;
  disk?: string;
  name?: string;
  afterCapture: 'resume' | 'quit';
  progress?: Progress;
}

/** Captures a running VM into the library: `snapshot` into a temporary directory, then import it. */
export async function captureBase(opts: CaptureBaseOptions): Promise<ImportResult> {
  const progress = opts.progress ?? silent;
  await mkdir(tmpDir(opts.root), { recursive: true });
  const dir = join(tmpDir(opts.root), `capture-${process.pid}-${Date.now()}`);
  try {
    const { root, instance, qmp, disk, afterCapture } = opts;
    await snapshotVm({ root, instance, qmp, disk, outDir: dir, afterCapture, progress });
    return await importSnapshotDir(root, dir, opts.name, progress);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

export async function listBases(root: string): Promise<{ message_type: 'base_list'; bases: BaseSummary[] }> {
  return { message_type: 'base_list', bases: await listLibraryBases(root) };
}

export type BaseShowMessage = { message_type: 'base_show' } & BaseManifest & { stored_bytes: number; dir: string };

export async function showBase(root: string, ref: string): Promise<BaseShowMessage> {
  return { message_type: 'base_show', ...(await showLibraryBase(root, await resolveBaseId(root, ref))) };
}

/** Removes a base, refused while a running instance uses it. */
export async function removeBase(root: string, ref: string): Promise<{ message_type: 'base_rm'; id: string }> {
  const id = await resolveBaseId(root, ref);
  const users = (await listInstances(root)).filter((i) => i.base_id === id && i.status === 'running');
  if (users.length > 0) {
    const names = users.map((u) => u.id).join(', ');
    throw new BusyError(`base ${id.slice(0, 12)} is in use by instance(s) ${names}: stop them first`, { base: id });
  }
  await removeLibraryBase(root, id);
  return { message_type: 'base_rm', id };
}

export async function exportBase(
  root: string,
  ref: string,
  output: string,
): Promise<{ message_type: 'base_export'; path: string; size: number }> {
  return { message_type: 'base_export', ...(await exportLibraryBase(root, await resolveBaseId(root, ref), output)) };
}

export async function verifyBase(root: string, ref: string, progress: Progress = silent): Promise<BaseVerifyResult> {
  return verifyLibraryBase(root, await resolveBaseId(root, ref), progress);
}
