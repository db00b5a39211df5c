/**
 * Lists the members of a base package (a tar file) before anything is extracted, and refuses
 * what a package may not hold. A package is untrusted input: `tar -x` as root would create a
 * FIFO (and the import would hang reading it), a device node (reading "a RAM file" would read a
 * host disk), a symlink or hard link to anywhere on the host. So only regular files (plain, or
 * GNU sparse) and directories pass, every name stays inside one `<base id>/` directory (no `..`,
 * no absolute path), and counts and sizes are bounded before they are trusted.
 *
 * Formats read: ustar and GNU tar (what `tar --sparse -c` writes: GNU long names `L`, old GNU
 * sparse members `S` with extension headers). Pax headers are refused: their records could
 * rename a member after this check, and our own packages never use them.
 */
import type { FileHandle } from 'node:fs/promises';
import { CorruptInputError, UnsupportedError } from '../util/errors.js';

const BLOCK = 512;
/** Members a package may hold (a base has a few dozen files). */
export const MAX_MEMBERS = 4096;
/** Largest member (its real size, holes included): 64 TiB. */
export const MAX_MEMBER_SIZE = 2 ** 46;
const MAX_NAME = 1024;
const MAX_SPARSE_EXTENSIONS = 4096;

export interface TarMember {
  /** Path inside the archive, without a trailing slash. */
  name: string;
  type: 'file' | 'dir';
  /** Bytes of the file once extracted (holes included). */
  size: number;
  /** Bytes the member's data takes in the archive (sparse members store only their data). */
  stored: number;
  /** Archive offset of the member's header. */
  offset: number;
}

/** Reads `n` bytes at `pos` of the archive (short reads allowed at the end). */
export type ReadAt = (pos: number, n: number) => Promise<Buffer>;

export function fileReader(fh: FileHandle): ReadAt {
  return async (pos, n) => {
    const buf = Buffer.alloc(n);
    const { bytesRead } = await fh.read(buf, 0, n, pos);
    return buf.subarray(0, bytesRead);
  };
}

export function bufferReader(data: Buffer): ReadAt {
  return (pos, n) => Promise.resolve(data.subarray(pos, Math.min(data.length, pos + n)));
}

function bad(message: string, offset: number): CorruptInputError {
  return new CorruptInputError(`package: ${message} (at byte ${offset})`, { offset });
}

/** A NUL-terminated field as text (latin1: names are checked against a strict pattern later). */
function text(h: Buffer, at: number, len: number): string {
  const field = h.subarray(at, at + len);
  const nul = field.indexOf(0);
  return field.subarray(0, nul < 0 ? len : nul).toString('latin1');
}

/** A numeric field: octal digits (space/NUL padded), or GNU base-256 when the high bit is set. */
function num(h: Buffer, at: number, len: number, offset: number, what: string): number {
  const field = h.subarray(at, at + len);
  if ((field[0]! & 0x80) !== 0) {
    if (field[0] !== 0x80) throw bad(`${what}: negative or huge base-256 number`, offset);
    let v = 0;
    for (let i = 1; i < len; i++) {
      v = v * 256 + field[i]!;
      if (v > Number.MAX_SAFE_INTEGER) throw bad(`${what}: number out of range`, offset);
    }
    return v;
  }
  const s = field
    .toString('latin1')
    .replace(/[\0 ]+$/, '')
    .replace(/^ +/, '');
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw bad(`${what}: not an octal number`, offset);
  const v = parseInt(s, 8);
  if (!Number.isSafeInteger(v)) throw bad(`${what}: number out of range`, offset);
  return v;
}

function checksumOk(h: Buffer, offset: number): boolean {
  const stored = num(h, 148, 8, offset, 'checksum');
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += i >= 148 && i < 156 ? 0x20 : h[i]!;
  return sum === stored;
}

function isZeroBlock(h: Buffer): boolean {
  for (const b of h) if (b !== 0) return false;
  return true;
}

/** A member name must be plain: relative, no `.`/`..` components, printable ASCII without `\`. */
function checkName(name: string, offset: number): string {
  const n = name.replace(/\/+$/, '');
  if (n.length === 0 || n.length > MAX_NAME) throw bad('empty or overlong member name', offset);
  if (!/^[A-Za-z0-9@._+=,:~-]+(\/[A-Za-z0-9@._+=,:~-]+)*$/.test(n)) {
    throw bad(`member name ${JSON.stringify(n)} is not a plain relative path`, offset);
  }
  if (n.split('/').some((c) => c === '.' || c === '..'))
    throw bad(`member name ${JSON.stringify(n)} leaves its directory`, offset);
  return n;
}

const TYPE_NAMES: { [t: string]: string } = {
  '1': 'a hard link',
  '2': 'a symbolic link',
  '3': 'a character device',
  '4': 'a block device',
  '6': 'a FIFO',
  '7': 'a contiguous file',
  K: 'a long link name',
  x: 'a pax header',
  g: 'a pax global header',
  V: 'a volume label',
  M: 'a multi-volume continuation',
  D: 'a directory dump',
  N: 'an old GNU long name',
};

/**
 * Lists every member of the archive, refusing anything but regular files and directories. The
 * archive must end with its end-of-archive blocks (a truncated package is refused).
 */
export async function listPackage(read: ReadAt, archiveSize: number): Promise<TarMember[]> {
  const members: TarMember[] = [];
  let pos = 0;
  let longName: string | undefined;
  const seen = new Set<string>();
  for (;;) {
    if (pos + BLOCK > archiveSize) throw bad('truncated (no end-of-archive marker)', pos);
    const h = await read(pos, BLOCK);
    if (h.length < BLOCK) throw bad('truncated header', pos);
    if (isZeroBlock(h)) {
      if (longName !== undefined) throw bad('long name without a member', pos);
      return members;
    }
    if (!checksumOk(h, pos)) throw bad('header checksum mismatch (not a tar file, or damaged)', pos);
    const magic = h.subarray(257, 263).toString('latin1');
    const gnu = magic === 'ustar ' && h[263] === 0x20;
    const posix = magic === 'ustar\0';
    if (!gnu && !posix) throw bad('not a ustar/GNU tar header', pos);
    const type = String.fromCharCode(h[156]!);
    const size = num(h, 124, 12, pos, 'size');
    if (size > MAX_MEMBER_SIZE) throw bad(`member of ${size} bytes is too large`, pos);
    const headerAt = pos;
    pos += BLOCK;

    if (type === 'L' && gnu) {
      if (longName !== undefined) throw bad('two long names in a row', headerAt);
      if (size === 0 || size > MAX_NAME + 1) throw bad('implausible long name', headerAt);
      const data = await read(pos, size);
      if (data.length < size) throw bad('truncated long name', headerAt);
      const nul = data.indexOf(0);
      longName = data.subarray(0, nul < 0 ? size : nul).toString('latin1');
      pos += Math.ceil(size / BLOCK) * BLOCK;
      continue;
    }
    const what = TYPE_NAMES[type];
    if (what) {
      const kind = type === 'x' || type === 'g' || type === 'K' || type === 'N' ? UnsupportedError : CorruptInputError;
      throw new kind(
        `package: holds ${what} (${JSON.stringify(longName ?? text(h, 0, 100))}): only regular files and directories are allowed`,
        { offset: headerAt },
      );
    }
    let name = longName ?? text(h, 0, 100);
    if (longName === undefined && posix) {
      const prefix = text(h, 345, 155);
      if (prefix) name = `${prefix}/${name}`;
    }
    longName = undefined;

    if (type === '5') {
      if (size !== 0) throw bad('directory with data', headerAt);
      members.push({ name: checkName(name, headerAt), type: 'dir', size: 0, stored: 0, offset: headerAt });
    } else if (type === '0' || type === '\0') {
      members.push({ name: checkName(name, headerAt), type: 'file', size, stored: size, offset: headerAt });
      pos += Math.ceil(size / BLOCK) * BLOCK;
    } else if (type === 'S' && gnu) {
      const realSize = num(h, 483, 12, headerAt, 'sparse real size');
      if (realSize > MAX_MEMBER_SIZE) throw bad(`sparse member of ${realSize} bytes is too large`, headerAt);
      let stored = 0;
      const entry = (block: Buffer, at: number): void => {
        const off = num(block, at, 12, headerAt, 'sparse offset');
        const len = num(block, at + 12, 12, headerAt, 'sparse length');
        if (off + len > realSize) throw bad('sparse map runs past the file size', headerAt);
        stored += len;
      };
      for (let i = 0; i < 4; i++) if (h[386 + i * 24] !== 0) entry(h, 386 + i * 24);
      let extended = h[482] !== 0;
      let extensions = 0;
      while (extended) {
        if (++extensions > MAX_SPARSE_EXTENSIONS) throw bad('too many sparse extension headers', headerAt);
        const x = await read(pos, BLOCK);
        if (x.length < BLOCK) throw bad('truncated sparse extension header', headerAt);
        for (let i = 0; i < 21; i++) if (x[i * 24] !== 0) entry(x, i * 24);
        extended = x[504] !== 0;
        pos += BLOCK;
      }
      if (stored !== size) throw bad('sparse map disagrees with the stored size', headerAt);
      members.push({ name: checkName(name, headerAt), type: 'file', size: realSize, stored: size, offset: headerAt });
      pos += Math.ceil(size / BLOCK) * BLOCK;
    } else {
      throw new CorruptInputError(`package: member of unknown type 0x${h[156]!.toString(16)}`, { offset: headerAt });
    }
    if (members.length > MAX_MEMBERS) throw bad(`more than ${MAX_MEMBERS} members`, headerAt);
    const last = members[members.length - 1]!.name;
    if (seen.has(last)) throw bad(`member ${JSON.stringify(last)} appears twice`, headerAt);
    seen.add(last);
    if (pos > archiveSize) throw bad('truncated member data', headerAt);
  }
}
