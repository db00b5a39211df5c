/**
 * Where the assembler keeps chunks it rebuilt from literal records, so that later references
 * (SELF_REF, SHIFT_* from rebuilt targets) can read them back whatever the outputs are — a
 * migration stream flowing into QEMU cannot be read back. The interface is here; a file-backed
 * store (bounded memory) lives in src/image, a memory one below serves small jobs and tests.
 */
export interface ChunkStore {
  /** Keeps a copy of `data`; resolves to where it can be read back. */
  put(data: Uint8Array): Promise<number>;
  /** Reads `length` bytes kept at `loc` into out[0, length). */
  read(loc: number, length: number, out: Buffer): Promise<void>;
  close(): Promise<void>;
}

/** A ChunkStore in memory, in slabs of 16 MiB. */
export class MemoryChunkStore implements ChunkStore {
  private static readonly SLAB = 16 << 20;
  private readonly slabs: Buffer[] = [];
  private fill = MemoryChunkStore.SLAB;

  put(data: Uint8Array): Promise<number> {
    if (this.fill + data.length > MemoryChunkStore.SLAB) {
      this.slabs.push(Buffer.allocUnsafe(Math.max(MemoryChunkStore.SLAB, data.length)));
      this.fill = 0;
    }
    const slab = this.slabs.length - 1;
    this.slabs[slab]!.set(data, this.fill);
    const loc = slab * MemoryChunkStore.SLAB + this.fill;
    this.fill += data.length;
    return Promise.resolve(loc);
  }

  read(loc: number, length: number, out: Buffer): Promise<void> {
    const slab = this.slabs[Math.floor(loc / MemoryChunkStore.SLAB)];
    const off = loc % MemoryChunkStore.SLAB;
    if (!slab) throw new RangeError(`MemoryChunkStore: no chunk at ${loc}`);
    slab.copy(out, 0, off, off + length);
    return Promise.resolve();
  }

  close(): Promise<void> {
    this.slabs.length = 0;
    return Promise.resolve();
  }
}
