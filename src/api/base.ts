/**
 * The base library as the CLI uses it: import (from a snapshot directory, a package, or
 * files), capture (snapshot a running VM straight into the library), list, show, remove
 * (refused while a running instance uses the base), export, verify. Bases are named by id,
 * unique id prefix or name; every result is one message object.
 */
import { mkdir, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { importBase, type ImportResult } from '../base/import.js';
import {
  listBases as listLibraryBases,
  removeBase as removeLibraryBase,
  resolveBaseId,
  showBase as showLibraryBase,
  verifyBase as verifyLibraryBase,
  type BaseSummary,
  type BaseVerifyResult,
} from '../base/library.js';
import type { BaseManifest } from '../base/manifest.js';
import { exportPackage, importPackage } from '../base/package.js';
import type { SignatureStatus, SigningKey, TrustedKey } from '../util/sign.js';
import { sweepLibrary } from './gc.js';
import { tmpDir } from '../base/paths.js';
import { listInstances } from '../instance/state.js';
import { BusyError, NotFoundError, UsageError, withPath } from '../util/errors.js';
import { lockBase } from '../base/locks.js';
import { silent, type Progress } from '../util/progress.js';
import { readSnapshotDir, snapshotVm } from './snapshot.js';
import { readVmSpecFile } from './base-ref.js';
import { ownerTag } from '../util/owner.js';

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
  /** For packages: refuse unsigned or wrongly signed ones when any key is trusted. */
  trust?: readonly TrustedKey[];
}

export interface BaseImportMessage {
  message_type: 'base_import';
  id: string;
  /** False when the library already held this base (nothing was added). */
  added: boolean;
  dir?: string;
  manifest?: BaseManifest;
  /** For packages: who signed it. */
  signature?: SignatureStatus;
}

export async function importBaseFrom(opts: BaseImportOptions): Promise<BaseImportMessage> {
  return withPath(opts.root, () => importInto(opts));
}

async function importInto(opts: BaseImportOptions): Promise<BaseImportMessage> {
  const progress = opts.progress ?? silent;
  const root = opts.root;
  await sweepLibrary(root);
  if (opts.input) {
    const input = opts.input;
    if (opts.disk || opts.memory || opts.vmFile)
      throw new UsageError('give a source or --disk/--memory/--vm, not both');
    const st = await stat(input).catch(() => {
      throw new NotFoundError(`${input} does not exist`, { path: input });
    });
    if (st.isDirectory()) return importSnapshotDir(root, input, opts.name, progress);
    if (opts.name !== undefined)
      throw new UsageError('a package carries its own name: --name is for directories and files');
    const r = await importPackage(root, input, { trust: opts.trust, progress });
    return { message_type: 'base_import', ...r };
  }
  const vm = opts.vmFile ? await readVmSpecFile(opts.vmFile) : undefined;
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
  const dir = join(tmpDir(opts.root), `capture-${ownerTag()}-${Date.now().toString(36)}`);
  try {
    const { root, instance, qmp, disk, afterCapture } = opts;
    await snapshotVm({ root, instance, qmp, disk, outDir: dir, afterCapture, progress, requireStorable: true });
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

/** Removes a base, refused while a running instance or an operation (a lock holder) uses it. */
export async function removeBase(root: string, ref: string): Promise<{ message_type: 'base_rm'; id: string }> {
  await sweepLibrary(root);
  const id = await resolveBaseId(root, ref);
  const instances = async (): Promise<string | undefined> => {
    const users = (await listInstances(root)).filter((i) => i.base_id === id && i.status === 'running');
    return users.length > 0 ? `instance(s) ${users.map((u) => u.id).join(', ')}` : undefined;
  };
  const running = await instances();
  if (running) {
    throw new BusyError(`base ${id.slice(0, 12)} is in use by ${running}: stop them first`, { base: id });
  }
  await removeLibraryBase(root, id, instances);
  return { message_type: 'base_rm', id };
}

export async function exportBase(
  root: string,
  ref: string,
  output: string,
  opts: { sign?: SigningKey; force?: boolean } = {},
): Promise<{ message_type: 'base_export'; path: string; size: number; signed_by?: string }> {
  const id = await resolveBaseId(root, ref);
  const unlock = await lockBase(root, id);
  try {
    return { message_type: 'base_export', ...(await exportPackage(root, id, output, opts)) };
  } finally {
    await unlock();
  }
}

export async function verifyBase(root: string, ref: string, progress: Progress = silent): Promise<BaseVerifyResult> {
  return verifyLibraryBase(root, await resolveBaseId(root, ref), progress);
}

export { gcLibrary } from './gc.js';
