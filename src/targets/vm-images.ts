/**
 * A VM as the differ sees it: its disk image and memory snapshot opened as targets, in the
 * order every overlay uses — the stream's blobs first (so a decoder has the stream header
 * before any page), then the disk, then the RAM blocks in stream order.
 */
import type { NewTarget } from '../delta/target.js';
import { openDisk, type DiskSource } from '../image/disk/open-disk.js';
import { openMemorySnapshot, type MemorySnapshot } from '../image/memory/snapshot.js';
import { UsageError } from '../util/errors.js';
import { BLOB_PREFIX, BLOB_START, BLOB_TAIL } from './blobs.js';

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
  let best = memory.blocks[0];
  for (const b of memory.blocks) if (!best || b.length > best.length) best = b;
  if (!best) throw new UsageError('the memory snapshot has no RAM block');
  return best.name;
}

/** The VM's targets in overlay order. */
/**
 * Which part of a VM comes first: a base lists the disk first (its id covers that order); an
 * overlay lists memory first, so that a synthesizing cloudlet can stream the memory into QEMU
 * while the disk is still arriving.
 */
export type TargetOrder = 'disk-first' | 'memory-first';

export function vmTargets(vm: VmImages, order: TargetOrder = 'disk-first'): NewTarget[] {
  const out: NewTarget[] = [];
  for (const [name, blob] of vm.blobs) out.push({ name, kind: 'blob', blob });
  const memory = vm.memory;
  const ram: NewTarget[] = memory
    ? memory.blocks.map((b) => ({ name: b.name, kind: 'ram', source: memory.block(b.name) }))
    : [];
  if (order === 'memory-first') out.push(...ram);
  if (vm.disk) out.push({ name: 'disk', kind: 'disk', source: vm.disk });
  if (order === 'disk-first') out.push(...ram);
  return out;
}
