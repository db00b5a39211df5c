/**
 * Where the assembler keeps chunks it rebuilt from literal records, so that later references
 * (SELF_REF, SHIFT_* from rebuilt targets) can read them back whatever the outputs are — a
 * migration stream flowing into QEMU cannot be read back. Buffers are adopted, not copied: a
 * decoded segment's data (never written to again) is kept as it is, and a chunk's location is
 * the buffer's location plus the chunk's offset in it.
 *
 * MemoryChunkStore keeps everything; src/image/scratch-store.ts spills to a file past a budget.
 */
export interface ChunkStore {
  /** Keeps `data` (which must not change afterwards); resolves to the location of its byte 0. */
  adopt(data: Uint8Array): Promise<number>;
  /** Reads `length` bytes kept at `loc` into out[0, length). */
  read(loc: number, length: number, out: Buffer): Promise<void>;
  close(): Promise<void>;
}

/** One adopted buffer; `data` null once it lives elsewhere (a subclass spilled it). */
export interface Kept {
  start: number;
  length: number;
  data: Uint8Array | null;
}

export class MemoryChunkStore implements ChunkStore {
  protected readonly kept: Kept[] = [];
  protected end = 0;

  adopt(data: Uint8Array): Promise<number> {
    const start = this.end;
    this.kept.push({ start, length: data.length, data });
    this.end += data.length;
    this.adopted(data.length);
    return Promise.resolve(start);
  }

  async read(loc: number, length: number, out: Buffer): Promise<void> {
    const k = this.find(loc);
    if (!k || loc + length > k.start + k.length) throw new RangeError(`chunk store: nothing kept at ${loc}+${length}`);
    if (k.data) out.set(k.data.subarray(loc - k.start, loc - k.start + length));
    else await this.readSpilled(loc, length, out);
  }

  close(): Promise<void> {
    this.kept.length = 0;
    return Promise.resolve();
  }

  /** Hook: called after each adopt. */
  protected adopted(_bytes: number): void {}

  protected readSpilled(loc: number, _length: number, _out: Buffer): Promise<void> {
    return Promise.reject(new RangeError(`chunk store: ${loc} was not kept in memory`));
  }

  private find(loc: number): Kept | undefined {
    let lo = 0;
    let hi = this.kept.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const k = this.kept[mid]!;
      if (loc < k.start) hi = mid - 1;
      else if (loc >= k.start + k.length) lo = mid + 1;
      else return k;
    }
    return undefined;
  }
}
