/** A ChunkSource over a Buffer in memory: for blobs-as-targets and for tests. */
import type { ChunkSource, Extent } from './source.js';

export class BufferSource implements ChunkSource {
  constructor(
    readonly name: string,
    readonly data: Buffer,
  ) {}

  get size(): number {
    return this.data.length;
  }

  async read(offset: number, length: number, buf: Buffer): Promise<void> {
    const end = Math.min(this.data.length, offset + length);
    const n = Math.max(0, end - offset);
    if (n > 0) this.data.copy(buf, 0, offset, end);
    buf.fill(0, n, length);
  }

  async dataExtents(): Promise<Extent[]> {
    return this.data.length ? [{ start: 0, length: this.data.length }] : [];
  }
}
