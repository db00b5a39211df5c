/**
 * Where a chunk's content can be found: an open-addressing table from a 128-bit prefix of its
 * sha256 to (target, chunk). Typed arrays keep millions of entries cheap (24 bytes each,
 * table at most half full) where a Map of hex strings would cost ~10× that. 128 bits make an
 * accidental collision practically impossible, and apply re-proves every target anyway.
 */
import type { ChunkMap } from './chunk-map.js';

export interface Location {
  target: number;
  chunk: number;
}

export class HashIndex {
  private cap: number;
  private keys: Uint32Array; // 4 words per slot
  private vals: Uint32Array; // target + 1 (0 = empty slot), chunk
  private n = 0;

  constructor(expected = 1024) {
    let cap = 1024;
    while (cap < expected * 2) cap *= 2;
    this.cap = cap;
    this.keys = new Uint32Array(cap * 4);
    this.vals = new Uint32Array(cap * 2);
  }

  get size(): number {
    return this.n;
  }

  /** Adds the location unless the hash is already known (the first location wins). */
  add(hash: Uint8Array, target: number, chunk: number): void {
    if ((this.n + 1) * 2 > this.cap) this.grow();
    this.insert(hash, target, chunk);
  }

  get(hash: Uint8Array): Location | undefined {
    const slot = this.slotOf(hash);
    const t = this.vals[slot * 2]!;
    return t === 0 ? undefined : { target: t - 1, chunk: this.vals[slot * 2 + 1]! };
  }

  /** The table in shared memory: worker threads read it without a copy (fromShared). */
  toShared(): SharedIndex {
    return { cap: this.cap, n: this.n, keys: share(this.keys), vals: share(this.vals) };
  }

  /** A read-only view of a table made by toShared() (adding to it is not safe across threads). */
  static fromShared(s: SharedIndex): HashIndex {
    const idx = new HashIndex(0);
    idx.cap = s.cap;
    idx.n = s.n;
    idx.keys = new Uint32Array(s.keys);
    idx.vals = new Uint32Array(s.vals);
    return idx;
  }

  /** Indexes every chunk of a chunk map as belonging to `target`. */
  addMap(map: ChunkMap, target: number): void {
    for (let i = 0; i < map.count; i++) this.add(map.hashAt(i), target, map.indexes[i]!);
  }

  private insert(hash: Uint8Array, target: number, chunk: number): void {
    const slot = this.slotOf(hash);
    if (this.vals[slot * 2] !== 0) return; // known: the first location wins
    for (let w = 0; w < 4; w++) this.keys[slot * 4 + w] = readU32(hash, w * 4);
    this.vals[slot * 2] = target + 1;
    this.vals[slot * 2 + 1] = chunk;
    this.n++;
  }

  /** The slot holding this hash, or the empty slot where it would go (linear probing). */
  private slotOf(hash: Uint8Array): number {
    const k0 = readU32(hash, 0);
    const k1 = readU32(hash, 4);
    const k2 = readU32(hash, 8);
    const k3 = readU32(hash, 12);
    const mask = this.cap - 1;
    for (let slot = k0 & mask; ; slot = (slot + 1) & mask) {
      if (this.vals[slot * 2] === 0) return slot;
      const o = slot * 4;
      if (this.keys[o] === k0 && this.keys[o + 1] === k1 && this.keys[o + 2] === k2 && this.keys[o + 3] === k3)
        return slot;
    }
  }

  private grow(): void {
    const oldKeys = this.keys;
    const oldVals = this.vals;
    const oldCap = this.cap;
    this.cap *= 2;
    this.keys = new Uint32Array(this.cap * 4);
    this.vals = new Uint32Array(this.cap * 2);
    this.n = 0;
    const key = Buffer.alloc(16);
    for (let s = 0; s < oldCap; s++) {
      const t = oldVals[s * 2]!;
      if (t === 0) continue;
      for (let w = 0; w < 4; w++) key.writeUInt32LE(oldKeys[s * 4 + w]!, w * 4);
      this.insert(key, t - 1, oldVals[s * 2 + 1]!);
    }
  }
}

/** A HashIndex's arrays in shared memory. */
export interface SharedIndex {
  cap: number;
  n: number;
  keys: SharedArrayBuffer;
  vals: SharedArrayBuffer;
}

function share(a: Uint32Array): SharedArrayBuffer {
  const sab = new SharedArrayBuffer(a.byteLength);
  new Uint32Array(sab).set(a);
  return sab;
}

function readU32(b: Uint8Array, off: number): number {
  return (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16) | (b[off + 3]! << 24)) >>> 0;
}
