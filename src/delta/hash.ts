/**
 * Chunk hashes and target digests. A target's digest covers its size and the sha256 of every
 * non-zero chunk with its index, in order; zero chunks are implied by their absence. So a
 * digest can be computed from a base's chunk map plus the changed chunks alone: proving a
 * synthesized target costs time in proportion to its data, not its (sparse) virtual size.
 */
import { createHash, hash as oneShotHash, type Hash } from 'node:crypto';

export const HASH_SIZE = 32;

export function chunkHash(data: Uint8Array): Buffer {
  return oneShotHash('sha256', data, 'buffer');
}

export function sha256Hex(data: Uint8Array): string {
  return oneShotHash('sha256', data, 'hex');
}

const DIGEST_DOMAIN = Buffer.from('cloudlet-overlay target digest v1\0', 'latin1');
const ENTRY = 8 + HASH_SIZE;
const BATCH = 4096;

/**
 * Streaming target digest: add the non-zero chunks in ascending index order, then finish().
 * The batch buffer grows with use (a reader may hold one per target: a target that gets few
 * chunks costs a few bytes, not a full batch).
 */
export class TargetDigest {
  private readonly h: Hash = createHash('sha256');
  private batch = Buffer.alloc(0);
  private fill = 0;
  private last = -1;

  constructor(readonly size: number) {
    const head = Buffer.alloc(8);
    head.writeBigUInt64LE(BigInt(size));
    this.h.update(DIGEST_DOMAIN);
    this.h.update(head);
  }

  add(index: number, hash: Uint8Array): void {
    if (index <= this.last) throw new Error(`TargetDigest: chunk ${index} after ${this.last}`);
    this.last = index;
    const at = this.fill * ENTRY;
    if (at + ENTRY > this.batch.length) {
      const grown = Buffer.alloc(Math.min(ENTRY * BATCH, Math.max(ENTRY * 16, this.batch.length * 4)));
      this.batch.copy(grown, 0, 0, at);
      this.batch = grown;
    }
    // u64 little-endian without a BigInt per chunk (this runs once per non-zero chunk).
    this.batch.writeUInt32LE(index % 0x100000000, at);
    this.batch.writeUInt32LE(Math.floor(index / 0x100000000), at + 4);
    this.batch.set(hash, at + 8);
    if (++this.fill === BATCH) this.flush();
  }

  finish(): string {
    this.flush();
    return this.h.digest('hex');
  }

  private flush(): void {
    if (this.fill > 0) this.h.update(this.batch.subarray(0, this.fill * ENTRY));
    this.fill = 0;
  }
}
