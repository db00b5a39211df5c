/** A base VM's manifest: what it holds and what a resume of it must match. */
import { readFile } from 'node:fs/promises';
import type { TargetInfo } from '../delta/target.js';
import type { VmSpec } from '../spec/vm-spec.js';
import { CorruptInputError, NotFoundError } from '../util/errors.js';

export interface BaseManifest {
  format: 'cloudlet-overlay-base';
  version: 1;
  id: string;
  name?: string;
  created_at: string;
  creator: string;
  /** Targets in overlay order (blobs, disk, RAM blocks) with digests; the id covers them. */
  targets: TargetInfo[];
  disk?: { file: string; format: 'raw' | 'qcow2'; virtual_size: number };
  memory?: {
    machine: string;
    main_block: string;
    ram_section_id: number;
    /** Block name → file under the base directory. */
    files: { [block: string]: string };
    blobs: { prefix: string; start: string; tail: string };
  };
  /**
   * How the base VM runs: machine type, RAM, CPU, devices, kernel/initrd/append. Drive 0 is
   * the disk; file paths are relative to the base directory.
   */
  vm?: VmSpec;
  /** QEMU version the snapshot was taken with, when known. */
  qemu_version?: string;
}

export async function readManifest(path: string): Promise<BaseManifest> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch {
    throw new NotFoundError(`no base manifest at ${path}`, { path });
  }
  let m: unknown;
  try {
    m = JSON.parse(text);
  } catch {
    throw new CorruptInputError(`${path}: not valid JSON`);
  }
  const o = m as Partial<BaseManifest>;
  if (
    o?.format !== 'cloudlet-overlay-base' ||
    o.version !== 1 ||
    typeof o.id !== 'string' ||
    !Array.isArray(o.targets)
  ) {
    throw new CorruptInputError(`${path}: not a cloudlet-overlay base manifest`);
  }
  return o as BaseManifest;
}
