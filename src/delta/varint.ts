/**
 * Unsigned LEB128 varints for record fields: chunk numbers and counts are mostly small, and
 * a varint reader can check bounds before trusting a value.
 */
import { check } from '../util/errors.js';

/** Writes `value` (a safe non-negative integer) at `pos`; returns the new position. */
export function writeUvarint(buf: Buffer, pos: number, value: number): number {
  let v = value;
  while (v >= 0x80) {
    buf[pos++] = (v % 0x80) | 0x80;
    v = Math.floor(v / 0x80);
  }
  buf[pos++] = v;
  return pos;
}

export function uvarintLength(value: number): number {
  let n = 1;
  let v = value;
  while (v >= 0x80) {
    v = Math.floor(v / 0x80);
    n++;
  }
  return n;
}

/** A cursor over a buffer that refuses to read past its end. */
export class ByteReader {
  pos = 0;
  constructor(
    readonly buf: Buffer,
    readonly where: string,
  ) {}

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  u8(): number {
    check(this.pos < this.buf.length, `${this.where}: truncated`, { offset: this.pos });
    return this.buf[this.pos++]!;
  }

  uvarint(): number {
    let result = 0;
    let scale = 1;
    for (let i = 0; i < 8; i++) {
      const b = this.u8();
      result += (b & 0x7f) * scale;
      if (b < 0x80) {
        check(Number.isSafeInteger(result), `${this.where}: varint too large`, { offset: this.pos });
        return result;
      }
      scale *= 0x80;
    }
    check(false, `${this.where}: varint too long`, { offset: this.pos });
  }

  bytes(n: number): Buffer {
    check(n >= 0 && n <= this.remaining, `${this.where}: field of ${n} bytes runs past the end`, {
      offset: this.pos,
    });
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
}
