/**
 * Content-defined anchors, for finding data that moved by an amount that is not a multiple of
 * the chunk size (a file inside a tar archive, a 1 KiB-block filesystem, a buffer copied in
 * memory): a gear hash (FastCDC's rolling hash: one shift, one table lookup and one add per
 * byte; its top bits depend on the last 32 bytes only) picks positions from content alone,
 * ~1 per KiB, so the same bytes give the same anchors wherever they sit. An anchor's key hashes
 * the 64 bytes that start at it; the index maps keys to where they occur (target, byte offset).
 */
const WINDOW = 32;
export const KEY_LEN = 64;
/** An anchor where the top 10 bits of the hash are zero: one every 1 KiB on average. */
const MASK = 0xffc00000 | 0;
/** Anchors closer than this to the previous one are skipped (repetitive data would flood). */
const MIN_GAP = 128;

const GEAR = (() => {
  const t = new Int32Array(256);
  let x = 0x9e3779b9;
  for (let i = 0; i < 256; i++) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    t[i] = x | 0;
  }
  return t;
})();

/** Calls fn(pos) for every anchor whose key bytes [pos, pos + KEY_LEN) lie in [start, end). */
export function forEachAnchor(buf: Uint8Array, start: number, end: number, fn: (pos: number) => void): void {
  let h = 0;
  let last = -MIN_GAP;
  const stop = end - KEY_LEN;
  for (let i = start; i < end; i++) {
    h = ((h << 1) + GEAR[buf[i]!]!) | 0;
    if ((h & MASK) !== 0 || i - start < WINDOW - 1) continue;
    const pos = i - WINDOW + 1;
    if (pos > stop) return;
    if (pos - last < MIN_GAP || flat(buf, pos)) continue;
    last = pos;
    fn(pos);
  }
}

/** Key bytes all equal (zero pages, fill patterns): useless as an anchor. */
function flat(buf: Uint8Array, pos: number): boolean {
  const b = buf[pos];
  for (let i = pos + 1; i < pos + KEY_LEN; i++) if (buf[i] !== b) return false;
  return true;
}

/** Two independent 32-bit hashes of the key bytes (FNV-1a and a multiplicative mix). */
export function anchorKey(buf: Uint8Array, pos: number): [number, number] {
  let a = 0x811c9dc5;
  let b = 0x27d4eb2f;
  for (let i = pos; i < pos + KEY_LEN; i++) {
    const v = buf[i]!;
    a = Math.imul(a ^ v, 0x01000193);
    b = Math.imul(b + v, 0x85ebca6b) ^ (b >>> 13);
  }
  return [a >>> 0, b >>> 0];
}

/** An AnchorIndex's arrays in shared memory. */
export interface SharedAnchors {
  cap: number;
  n: number;
  keys: SharedArrayBuffer;
  targets: SharedArrayBuffer;
  offsets: SharedArrayBuffer;
}

export interface AnchorHit {
  target: number;
  offset: number;
}

/**
 * Open-addressing table from an anchor key to (target, byte offset); the first location
 * added for a key wins. Typed arrays: 20 bytes a slot, at most half full.
 */
export class AnchorIndex {
  private cap: number;
  private keys: Uint32Array;
  private targets: Uint32Array; // target + 1; 0 = empty
  private offsets: Float64Array;
  private n = 0;

  constructor(expected = 1024) {
    let cap = 1024;
    while (cap < expected * 2) cap *= 2;
    this.cap = cap;
    this.keys = new Uint32Array(cap * 2);
    this.targets = new Uint32Array(cap);
    this.offsets = new Float64Array(cap);
  }

  get size(): number {
    return this.n;
  }

  add(k0: number, k1: number, target: number, offset: number): void {
    if ((this.n + 1) * 2 > this.cap) this.grow();
    this.insert(k0, k1, target, offset);
  }

  get(k0: number, k1: number): AnchorHit | undefined {
    const mask = this.cap - 1;
    for (let s = k0 & mask; ; s = (s + 1) & mask) {
      const t = this.targets[s]!;
      if (t === 0) return undefined;
      if (this.keys[s * 2] === k0 && this.keys[s * 2 + 1] === k1) return { target: t - 1, offset: this.offsets[s]! };
    }
  }

  /** Indexes every anchor of buf[start, end), which sits at `base` in `target`. */
  addAll(buf: Uint8Array, start: number, end: number, target: number, base: number): void {
    forEachAnchor(buf, start, end, (pos) => {
      const [k0, k1] = anchorKey(buf, pos);
      this.add(k0, k1, target, base + pos - start);
    });
  }

  toBuffer(): Buffer {
    const head = Buffer.alloc(16);
    head.write('CLANCH02', 0, 'latin1');
    head.writeUInt32LE(this.cap, 8);
    head.writeUInt32LE(this.n, 12);
    return Buffer.concat([
      head,
      Buffer.from(this.keys.buffer, this.keys.byteOffset, this.keys.byteLength),
      Buffer.from(this.targets.buffer, this.targets.byteOffset, this.targets.byteLength),
      Buffer.from(this.offsets.buffer, this.offsets.byteOffset, this.offsets.byteLength),
    ]);
  }

  /** The table in shared memory: worker threads read it without a copy (fromShared). */
  toShared(): SharedAnchors {
    const sab = (a: Uint32Array | Float64Array): SharedArrayBuffer => {
      const b = new SharedArrayBuffer(a.byteLength);
      new Uint8Array(b).set(new Uint8Array(a.buffer, a.byteOffset, a.byteLength));
      return b;
    };
    return { cap: this.cap, n: this.n, keys: sab(this.keys), targets: sab(this.targets), offsets: sab(this.offsets) };
  }

  /** A read-only view of a table made by toShared(). */
  static fromShared(s: SharedAnchors): AnchorIndex {
    const idx = new AnchorIndex(0);
    idx.cap = s.cap;
    idx.n = s.n;
    idx.keys = new Uint32Array(s.keys);
    idx.targets = new Uint32Array(s.targets);
    idx.offsets = new Float64Array(s.offsets);
    return idx;
  }

  /** Reads toBuffer()'s output; undefined when the bytes are not an anchor index. */
  static fromBuffer(buf: Buffer): AnchorIndex | undefined {
    if (buf.length < 16 || buf.toString('latin1', 0, 8) !== 'CLANCH02') return undefined;
    const cap = buf.readUInt32LE(8);
    const n = buf.readUInt32LE(12);
    if ((cap & (cap - 1)) !== 0 || cap < 1024 || n * 2 > cap || buf.length !== 16 + cap * 20) return undefined;
    const idx = new AnchorIndex(0);
    idx.cap = cap;
    idx.n = n;
    const copy = Buffer.from(buf); // aligned copies for the typed arrays
    idx.keys = new Uint32Array(copy.buffer.slice(copy.byteOffset + 16, copy.byteOffset + 16 + cap * 8));
    idx.targets = new Uint32Array(copy.buffer.slice(copy.byteOffset + 16 + cap * 8, copy.byteOffset + 16 + cap * 12));
    idx.offsets = new Float64Array(copy.buffer.slice(copy.byteOffset + 16 + cap * 12, copy.byteOffset + 16 + cap * 20));
    return idx;
  }

  private insert(k0: number, k1: number, target: number, offset: number): void {
    const mask = this.cap - 1;
    for (let s = k0 & mask; ; s = (s + 1) & mask) {
      if (this.targets[s] === 0) {
        this.keys[s * 2] = k0;
        this.keys[s * 2 + 1] = k1;
        this.targets[s] = target + 1;
        this.offsets[s] = offset;
        this.n++;
        return;
      }
      if (this.keys[s * 2] === k0 && this.keys[s * 2 + 1] === k1) return;
    }
  }

  private grow(): void {
    const { keys, targets, offsets, cap } = this;
    this.cap *= 2;
    this.keys = new Uint32Array(this.cap * 2);
    this.targets = new Uint32Array(this.cap);
    this.offsets = new Float64Array(this.cap);
    this.n = 0;
    for (let s = 0; s < cap; s++) {
      if (targets[s] !== 0) this.insert(keys[s * 2]!, keys[s * 2 + 1]!, targets[s]! - 1, offsets[s]!);
    }
  }
}
