/**
 * A set of chunk hashes in shared memory: the main thread adds each chunk it emits as a literal
 * (the ones later chunks can refer to); workers proposing later batches look their chunks up
 * and skip the literal work for those the ladder will turn into references. Lookups are racy
 * by design — a worker that misses an entry only does work in vain — and a hit is only a hint:
 * the ladder decides from its own full-hash index and computes a literal itself when a hint was
 * wrong (64-bit fingerprints can collide). So the overlay's bytes never depend on timing.
 */
import { HASH_SIZE } from './hash.js';

export class SharedHashes {
  private readonly slots: Int32Array;
  private readonly mask: number;
  private n = 0;

  /** `capacity`: at most this many hashes are kept (half the slots); more are dropped. */
  constructor(
    capacity: number,
    readonly buffer: SharedArrayBuffer = new SharedArrayBuffer(8 * slotsFor(capacity)),
  ) {
    this.slots = new Int32Array(buffer);
    this.mask = this.slots.length / 2 - 1;
  }

  add(hash: Uint8Array): void {
    if ((this.n + 1) * 2 > this.slots.length / 2) return;
    const [lo, hi] = fingerprint(hash);
    for (let s = lo & this.mask; ; s = (s + 1) & this.mask) {
      const a = this.slots[s * 2]!;
      const b = this.slots[s * 2 + 1]!;
      if (a === lo && b === hi) return;
      if (a === 0 && b === 0) {
        // High word first: a reader that sees only part of the entry sees no match.
        Atomics.store(this.slots, s * 2 + 1, hi);
        Atomics.store(this.slots, s * 2, lo);
        this.n++;
        return;
      }
    }
  }

  has(hash: Uint8Array): boolean {
    const [lo, hi] = fingerprint(hash);
    for (let s = lo & this.mask; ; s = (s + 1) & this.mask) {
      const a = Atomics.load(this.slots, s * 2);
      if (a === 0 && Atomics.load(this.slots, s * 2 + 1) === 0) return false;
      if (a === lo && Atomics.load(this.slots, s * 2 + 1) === hi) return true;
    }
  }
}

function slotsFor(capacity: number): number {
  let n = 1024;
  while (n < capacity * 2 && n < 1 << 22) n *= 2;
  return n;
}

/** The first 8 bytes of a sha256 as two non-zero-pair words (0,0 marks an empty slot). */
function fingerprint(hash: Uint8Array): [number, number] {
  if (hash.length < HASH_SIZE) throw new RangeError('SharedHashes: not a sha256');
  const lo = hash[0]! | (hash[1]! << 8) | (hash[2]! << 16) | (hash[3]! << 24) | 0;
  const hi = hash[4]! | (hash[5]! << 8) | (hash[6]! << 16) | (hash[7]! << 24) | 0;
  return lo === 0 && hi === 0 ? [1, 0] : [lo, hi];
}
