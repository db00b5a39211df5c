/** Byte edits for tests that damage or change data on purpose. */

/** buf[at] ^= mask, for an index known to be inside buf. */
export function xorByte(buf: Uint8Array, at: number, mask: number): void {
  if (at < 0 || at >= buf.length) throw new RangeError(`xorByte at ${at} outside a ${buf.length}-byte buffer`);
  buf[at] = (buf[at] ?? 0) ^ mask;
}
