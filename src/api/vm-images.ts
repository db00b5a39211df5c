/**
 * A VM as the differ sees it: its disk image and memory snapshot opened as targets, in the
 * order every overlay uses — the stream's blobs first (so a decoder has the stream header
 * before any page), then the disk, then the RAM blocks in stream order.
 */
import { sha256Hex } from '../delta/hash.js';
import { ChunkMap } from '../delta/chunk-map.js';
import { baseIdOf, type BaseTarget, type TargetInfo } from '../delta/target.js';
import { anchorBase, type NewTarget } from '../delta/diff.js';
import type { AnchorIndex } from '../delta/anchors.js';
import { openDisk, type DiskSource } from '../image/disk/open-disk.js';
import { openMemorySnapshot, type MemorySnapshot } from '../image/memory/snapshot.js';
import type { Progress } from '../util/progress.js';
import { UsageError } from '../util/errors.js';

export const BLOB_PREFIX = 'stream.prefix';
export const BLOB_START = 'stream.start';
export const BLOB_TAIL = 'stream.tail';

export interface VmImages {
  disk?: DiskSource;
  memory?: MemorySnapshot;
  /** prefix, start section and tail of the memory stream. */
  blobs: Map<string, Buffer>;
  close(): Promise<void>;
}

export interface OpenVmOptions {
  disk?: string;
  diskFormat?: string;
  memory?: string;
  tmpDir?: string;
}

export async function openVmImages(opts: OpenVmOptions): Promise<VmImages> {
  if (!opts.disk && !opts.memory) throw new UsageError('a VM needs a disk image, a memory snapshot, or both');
  let disk: DiskSource | undefined;
  let memory: MemorySnapshot | undefined;
  try {
    if (opts.disk) disk = await openDisk(opts.disk, { name: 'disk', tmpDir: opts.tmpDir, format: opts.diskFormat });
    const blobs = new Map<string, Buffer>();
    if (opts.memory) {
      memory = await openMemorySnapshot(opts.memory);
      memory.assertComplete();
      blobs.set(BLOB_PREFIX, await memory.prefixBytes());
      blobs.set(BLOB_START, await memory.startSectionBytes());
      blobs.set(BLOB_TAIL, await memory.tail());
    }
    const d = disk;
    const m = memory;
    return {
      disk: d,
      memory: m,
      blobs,
      async close() {
        await Promise.allSettled([d?.close(), m?.close()]);
      },
    };
  } catch (err) {
    await Promise.allSettled([disk?.close(), memory?.close()]);
    throw err;
  }
}

/** The largest RAM block: the one a synthesized VM maps from the base RAM file. */
export function mainBlockOf(memory: MemorySnapshot): string {
  let best = memory.blocks[0]!;
  for (const b of memory.blocks) if (b.length > best.length) best = b;
  return best.name;
}

export function vmTargets(vm: VmImages): NewTarget[] {
  const out: NewTarget[] = [];
  for (const [name, blob] of vm.blobs) out.push({ name, kind: 'blob', blob });
  if (vm.disk) out.push({ name: 'disk', kind: 'disk', source: vm.disk });
  if (vm.memory) for (const b of vm.memory.blocks) out.push({ name: b.name, kind: 'ram', source: vm.memory.block(b.name) });
  return out;
}

export function targetSize(t: NewTarget): number {
  return t.kind === 'blob' ? (t.blob?.length ?? 0) : (t.source?.size ?? 0);
}

/** A base VM ready for diff and patch: targets with chunk maps, and its id. */
export interface BaseVm {
  id: string;
  targets: BaseTarget[];
  infos: TargetInfo[];
  machine?: string;
  mainBlock?: string;
  ramSectionId?: number;
  diskPath?: string;
  diskFormat?: string;
  /** The main RAM block as a raw page-aligned file, when the base library has one. */
  ramFile?: string;
  /** Content anchors of the base (finds data that moved by a non-multiple of 4 KiB). */
  anchors?: AnchorIndex;
  close(): Promise<void>;
}

/** Base targets with their chunk maps and digests, and the content anchors over them. */
export interface IndexedTargets {
  targets: BaseTarget[];
  infos: TargetInfo[];
  anchors: AnchorIndex;
}

/**
 * Hashes every chunk of the given targets and indexes their content anchors: what a base needs
 * for diff and patch. Used for bases given as files and by the library's import.
 */
export async function indexTargets(list: readonly NewTarget[], progress: Progress): Promise<IndexedTargets> {
  const targets: BaseTarget[] = [];
  const infos: TargetInfo[] = [];
  for (const t of list) {
    if (t.kind === 'blob') {
      const blob = t.blob!;
      targets.push({ name: t.name, kind: t.kind, size: blob.length, blob });
      infos.push({ name: t.name, kind: t.kind, size: blob.length, digest: sha256Hex(blob) });
      continue;
    }
    const source = t.source!;
    progress.step(`hashing base ${t.name}`, source.size);
    const map = await ChunkMap.build(source, (n) => progress.advance(n));
    progress.done(`hashed base ${t.name}`);
    targets.push({ name: t.name, kind: t.kind, size: source.size, source, map });
    infos.push({ name: t.name, kind: t.kind, size: source.size, digest: map.digest() });
  }
  progress.step('indexing base content anchors');
  const anchors = await anchorBase(targets, (n) => progress.advance(n));
  progress.done('base anchors indexed');
  return { targets, infos, anchors };
}

/** A base VM opened from files: every chunk hashed (the base library keeps these maps instead). */
export async function baseFromImages(vm: VmImages, progress: Progress): Promise<BaseVm> {
  const { targets, infos, anchors } = await indexTargets(vmTargets(vm), progress);
  return {
    id: baseIdOf(infos),
    anchors,
    targets,
    infos,
    machine: vm.memory?.machineType,
    mainBlock: vm.memory ? mainBlockOf(vm.memory) : undefined,
    ramSectionId: vm.memory?.ramSectionId,
    diskPath: vm.disk?.path,
    diskFormat: vm.disk?.format,
    close: () => vm.close(),
  };
}
