/**
 * The three checksums on-disk partition tables and ext4 use, as their writers compute them:
 *
 * - crc32c (Castagnoli, reflected 0x82F63B78) *without* the final inversion: what the kernel's
 *   `ext4_chksum()` / `jbd2_chksum()` and e2fsprogs' `ext2fs_crc32c_le()` return. The caller
 *   chains it by passing the previous value as the seed (ext4 starts from ~0).
 * - crc16 as in Linux lib/crc16.c (reflected 0x8005, no final inversion): the old `gdt_csum`
 *   group descriptor checksum.
 * - crc32 (IEEE, reflected 0xEDB88320, initial and final inversion): the GPT header and entry
 *   array checksum (zlib's crc32).
 */

function table32(poly: number): Uint32Array {
  const t = new Uint32Array(256 * 8);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ poly : c >>> 1;
    t[i] = c >>> 0;
  }
  // Slice-by-8 tables: t[k*256 + i] is the crc of byte i followed by k zero bytes.
  for (let i = 0; i < 256; i++) {
    let c = t[i]!;
    for (let k = 1; k < 8; k++) {
      c = (t[c & 0xff]! ^ (c >>> 8)) >>> 0;
      t[k * 256 + i] = c;
    }
  }
  return t;
}

const CRC32C = table32(0x82f63b78);
const CRC32 = table32(0xedb88320);

function update32(t: Uint32Array, seed: number, data: Uint8Array): number {
  let c = seed >>> 0;
  let i = 0;
  const n = data.length;
  // Slice-by-8: eight bytes per step (a bitmap block of a large file system is 4 KiB or more).
  for (; i + 8 <= n; i += 8) {
    const a = (c ^ (data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24))) >>> 0;
    c =
      t[7 * 256 + (a & 0xff)]! ^
      t[6 * 256 + ((a >>> 8) & 0xff)]! ^
      t[5 * 256 + ((a >>> 16) & 0xff)]! ^
      t[4 * 256 + (a >>> 24)]! ^
      t[3 * 256 + data[i + 4]!]! ^
      t[2 * 256 + data[i + 5]!]! ^
      t[256 + data[i + 6]!]! ^
      t[data[i + 7]!]!;
  }
  for (; i < n; i++) c = t[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return c >>> 0;
}

/** Raw crc32c: seed in, register out, no inversion (ext4/jbd2 semantics). */
export function crc32cRaw(seed: number, data: Uint8Array): number {
  return update32(CRC32C, seed, data);
}

/** IEEE crc32 as zlib computes it (GPT); `prev` chains calls. */
export function crc32(data: Uint8Array, prev = 0): number {
  return (update32(CRC32, ~prev >>> 0, data) ^ 0xffffffff) >>> 0;
}

const CRC16 = (() => {
  const t = new Uint16Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0xa001 : c >>> 1;
    t[i] = c;
  }
  return t;
})();

/** Linux crc16(crc, buf): reflected 0x8005, the caller's seed, no final inversion. */
export function crc16(seed: number, data: Uint8Array): number {
  let c = seed & 0xffff;
  for (let i = 0; i < data.length; i++) c = (CRC16[(c ^ data[i]!) & 0xff]! ^ (c >>> 8)) & 0xffff;
  return c;
}
