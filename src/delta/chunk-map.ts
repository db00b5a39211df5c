/**
 * A chunk map lists the non-zero chunks of one target with their sha256, ascending. The base
 * library keeps one per base target, so create never rehashes a base and apply proves its
 * result without reading unchanged base data.
 */
import { CorruptInputError, check } from '../util/errors.js';
import { CHUNK_SIZE, chunkCount, extentsToChunkRanges, isZero } from './chunk.js';
import { HASH_SIZE, TargetDigest, chunkHash } from './hash.js';
import type { ChunkSource } from './source.js';

const MAGIC = Buffer.from('CLCHMAP1', 'latin1');
const HEADER = 8 + 8 + 4 + 4;

export class ChunkMap {
  constructor(
    readonly size: number,
    /** Ascending indexes of the non-zero chunks. */
    readonly indexes: Uint32Array,
    /** HASH_SIZE bytes per entry, same order as indexes. */
    readonly hashes: Buffer,
  ) {}

  get count(): number {
    return this.indexes.length;
  }

  hashAt(pos: number): Buffer {
    return this.hashes.subarray(pos * HASH_SIZE, (pos + 1) * HASH_SIZE);
  }

  /** Position of chunk `index` in the map, or -1 when that chunk is zero. */
  find(index: number): number {
    let lo = 0;
    let hi = this.indexes.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const v = this.indexes[mid]!;
      if (v === index) return mid;
      if (v < index) lo = mid + 1;
      else hi = mid - 1;
    }
    return -1;
  }

  /** First position whose index is >= `index`. */
  lowerBound(index: number): number {
    let lo = 0;
    let hi = this.indexes.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.indexes[mid]! < index) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  digest(): string {
    const d = new TargetDigest(this.size);
    for (let i = 0; i < this.indexes.length; i++) d.add(this.indexes[i]!, this.hashAt(i));
    return d.finish();
  }

  toBuffer(): Buffer {
    const out = Buffer.alloc(HEADER + this.count * (4 + HASH_SIZE));
    MAGIC.copy(out, 0);
    out.writeBigUInt64LE(BigInt(this.size), 8);
    out.writeUInt32LE(this.count, 16);
    let pos = HEADER;
    for (let i = 0; i < this.count; i++) {
      out.writeUInt32LE(this.indexes[i]!, pos);
      pos += 4;
    }
    this.hashes.copy(out, pos, 0, this.count * HASH_SIZE);
    return out;
  }

  static fromBuffer(buf: Buffer, where = 'chunk map'): ChunkMap {
    check(buf.length >= HEADER && buf.subarray(0, 8).equals(MAGIC), `${where}: not a chunk map`);
    const size = Number(buf.readBigUInt64LE(8));
    const count = buf.readUInt32LE(16);
    check(buf.length === HEADER + count * (4 + HASH_SIZE), `${where}: wrong length`);
    check(count <= chunkCount(size), `${where}: more entries than chunks`);
    const indexes = new Uint32Array(count);
    let prev = -1;
    for (let i = 0; i < count; i++) {
      const v = buf.readUInt32LE(HEADER + i * 4);
      if (v <= prev || v >= chunkCount(size)) {
        throw new CorruptInputError(`${where}: chunk indexes out of order or range`, { entry: i });
      }
      indexes[i] = v;
      prev = v;
    }
    const hashStart = HEADER + count * 4;
    return new ChunkMap(size, indexes, Buffer.from(buf.subarray(hashStart, hashStart + count * HASH_SIZE)));
  }

  /** Reads a whole source (only its data extents) and hashes every non-zero chunk. */
  static async build(source: ChunkSource, onBytes: (n: number) => void = () => undefined): Promise<ChunkMap> {
    const builder = new ChunkMapBuilder(source.size);
    const ranges = extentsToChunkRanges(await source.dataExtents(), source.size);
    const step = 256; // chunks per read: 1 MiB
    const buf = Buffer.alloc(step * CHUNK_SIZE);
    for (const [first, end] of ranges) {
      for (let c = first; c < end; c += step) {
        const n = Math.min(step, end - c);
        const len = Math.min(n * CHUNK_SIZE, source.size - c * CHUNK_SIZE);
        await source.read(c * CHUNK_SIZE, len, buf);
        for (let i = 0; i < n; i++) {
          const chunk = buf.subarray(i * CHUNK_SIZE, Math.min(len, (i + 1) * CHUNK_SIZE));
          if (!isZero(chunk)) builder.add(c + i, chunkHash(chunk));
        }
        onBytes(len);
      }
    }
    return builder.finish();
  }
}

/** Collects (index, hash) pairs in ascending order into a ChunkMap. */
export class ChunkMapBuilder {
  private indexes = new Uint32Array(1024);
  private hashes = Buffer.alloc(1024 * HASH_SIZE);
  private n = 0;

  constructor(readonly size: number) {}

  add(index: number, hash: Uint8Array): void {
    if (this.n === this.indexes.length) {
      const grown = new Uint32Array(this.n * 2);
      grown.set(this.indexes);
      this.indexes = grown;
      const hg = Buffer.alloc(this.n * 2 * HASH_SIZE);
      this.hashes.copy(hg);
      this.hashes = hg;
    }
    this.indexes[this.n] = index;
    this.hashes.set(hash, this.n * HASH_SIZE);
    this.n++;
  }

  finish(): ChunkMap {
    return new ChunkMap(
      this.size,
      this.indexes.slice(0, this.n),
      Buffer.from(this.hashes.subarray(0, this.n * HASH_SIZE)),
    );
  }
}
