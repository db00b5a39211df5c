/**
 * openDisk: any disk image qemu-img understands, as a ChunkSource of its guest-visible bytes.
 *
 * - raw: read directly with pread.
 * - qcow2 (with any backing chain of raw/qcow2 layers): `qemu-img map` says, for every range,
 *   which layer holds it and at which offset of that layer's file; uncompressed data is then
 *   read straight from those files. No copy, no temp space, cost ∝ bytes read.
 * - anything else (compressed or encrypted clusters, external data files, other formats):
 *   `qemu-img convert -O raw` into a sparse temp file, removed on close() and by the cleanup
 *   registry.
 *
 * The image (and its backing files) must not change while it is open.
 */
import { open, rm, stat, type FileHandle } from 'node:fs/promises';
import { stagingDir } from '../../util/atomic.js';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { ChunkSource, Extent } from '../../delta/source.js';
import { onCleanup } from '../../util/cleanup.js';
import { CloudletError, CorruptInputError, NotFoundError, QemuError } from '../../util/errors.js';
import { mergeExtents } from './extents.js';
import { PieceReader, type Piece } from './piece-reader.js';
import * as qemuImg from './qemu-img.js';
import type { ImageInfo, MapEntry } from './qemu-img.js';

export interface DiskSource extends ChunkSource {
  readonly path: string;
  /** Image format of the file itself ("raw", "qcow2", ...). */
  readonly format: string;
  /** How reads are served: straight from the image files, or from a converted temp copy. */
  readonly access: 'direct' | 'converted';
  /**
   * Ranges the image's own top layer defines (data or zero clusters); every byte outside them
   * comes unchanged from the backing chain. An image without backing file: the whole disk.
   */
  ownExtents(): Promise<Extent[]>;
  close(): Promise<void>;
}

export interface OpenDiskOptions {
  /** ChunkSource name; default "disk". */
  name?: string;
  /** Where a converted raw view goes when one is needed; default os.tmpdir(). */
  tmpDir?: string;
  /** Image format; default: probed by qemu-img (pass it whenever it is known). */
  format?: string;
  /**
   * Run `qemu-img check` on every qcow2 layer first and refuse a damaged one (a truncated qcow2
   * would otherwise read as zeros past its end). Default true; the base library's own files,
   * checked at import, pass false.
   */
  check?: boolean;
}

export interface BackingFile {
  /** Absolute path (or the qemu filename, e.g. "json:{...}", when it is not a plain file). */
  filename: string;
  format: string;
  virtualSize: number;
}

/** Formats whose `map` offsets point into the layer's own file (when not compressed/encrypted). */
const DIRECT_FORMATS = new Set(['raw', 'qcow2']);

export async function openDisk(path: string, opts: OpenDiskOptions = {}): Promise<DiskSource> {
  await requireReadable(path);
  const name = opts.name ?? 'disk';
  // A raw image named as such needs no qemu-img run (~30 ms a spawn, on synthesis's path):
  // its virtual size is the file size rounded up to 512 bytes, as QEMU sees it.
  const chain: ImageInfo[] =
    opts.format === 'raw'
      ? [
          {
            filename: resolve(path),
            format: 'raw',
            virtualSize: Math.ceil((await stat(path)).size / 512) * 512,
            encrypted: false,
            dirty: false,
          },
        ]
      : await openChain(path, opts.format);
  const top = chain[0];
  if (!top) throw new QemuError(`qemu-img info printed no image for ${path}`, { path });
  if (opts.check ?? true) await checkLayers(chain);
  const format = top.format;
  if (format === 'raw') {
    const handle = await open(path, 'r');
    return new MappedDisk({
      name,
      path,
      format,
      size: top.virtualSize,
      access: 'direct',
      reader: new PieceReader([{ start: 0, length: top.virtualSize, file: 0, offset: 0 }], [handle]),
      handles: [handle],
      entries: null,
      own: [{ start: 0, length: top.virtualSize }],
    });
  }

  const entries = await qemuImg.map(path, format);
  checkCoverage(entries, top.virtualSize, path);
  const own =
    chain.length > 1
      ? mergeExtents(entries.filter((e) => e.depth === 0 && e.present))
      : [{ start: 0, length: top.virtualSize }];
  const common = { name, path, format, size: top.virtualSize, entries, own };

  const direct = await directPieces(entries, chain);
  if (direct) {
    const reader = new PieceReader(direct.pieces, direct.handles);
    return new MappedDisk({ ...common, access: 'direct', reader, handles: direct.handles });
  }

  const view = await convertedView(path, format, opts.tmpDir ?? tmpdir());
  return new MappedDisk({
    ...common,
    access: 'converted',
    reader: new PieceReader([{ start: 0, length: top.virtualSize, file: 0, offset: 0 }], [view.handle]),
    handles: [view.handle],
    removeTemp: view.remove,
  });
}

/** The backing files of an image, nearest first (the image itself is not included). */
export async function backingChain(path: string, opts: { format?: string } = {}): Promise<BackingFile[]> {
  await requireReadable(path);
  const chain = await openChain(path, opts.format);
  return chain
    .slice(1)
    .map((i) => ({ filename: hostFilename(i.filename), format: i.format, virtualSize: i.virtualSize }));
}

interface MappedDiskInit {
  name: string;
  path: string;
  format: string;
  size: number;
  access: 'direct' | 'converted';
  reader: PieceReader;
  /** Closed by close(). */
  handles: FileHandle[];
  /** The image's `qemu-img map`, when already known (else loaded by dataExtents()). */
  entries: MapEntry[] | null;
  own: Extent[];
  removeTemp?: () => Promise<void>;
}

class MappedDisk implements DiskSource {
  readonly name: string;
  readonly path: string;
  readonly format: string;
  readonly size: number;
  readonly access: 'direct' | 'converted';
  private extents: Promise<Extent[]> | null = null;
  private closed = false;

  constructor(private readonly init: MappedDiskInit) {
    this.name = init.name;
    this.path = init.path;
    this.format = init.format;
    this.size = init.size;
    this.access = init.access;
  }

  read(offset: number, length: number, buf: Buffer): Promise<void> {
    if (this.closed) return Promise.reject(new CloudletError(`disk ${this.path} is closed`));
    return this.init.reader.read(offset, length, buf);
  }

  dataExtents(): Promise<Extent[]> {
    this.extents ??= this.loadExtents();
    return this.extents.then((list) => list.map((e) => ({ ...e })));
  }

  ownExtents(): Promise<Extent[]> {
    return Promise.resolve(this.init.own.map((e) => ({ ...e })));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.all(this.init.handles.map((h) => h.close().catch(() => undefined)));
    if (this.init.removeTemp) await this.init.removeTemp();
  }

  private async loadExtents(): Promise<Extent[]> {
    const entries = this.init.entries ?? (await qemuImg.map(this.path, this.format));
    return mergeExtents(entries.filter((e) => e.present && !e.zero));
  }
}

async function requireReadable(path: string): Promise<void> {
  let st;
  try {
    st = await stat(path);
  } catch (err) {
    throw new NotFoundError(`disk image ${path} does not exist or cannot be read`, { path }, { cause: err });
  }
  if (!st.isFile() && !st.isBlockDevice()) {
    throw new NotFoundError(`${path} is not a disk image file`, { path });
  }
  try {
    const h = await open(path, 'r');
    await h.close();
  } catch (err) {
    throw new NotFoundError(`disk image ${path} cannot be read`, { path }, { cause: err });
  }
}

/** The image and its backing files, nearest first; the format is probed when not given. */
async function openChain(path: string, format: string | undefined): Promise<ImageInfo[]> {
  try {
    return await qemuImg.info(path, format !== undefined ? { format, backingChain: true } : { backingChain: true });
  } catch (err) {
    throw asOpenError(err, path, format);
  }
}

/** qemu-img could not open an image that exists: a missing backing file, or not that format. */
function asOpenError(err: unknown, path: string, format: string | undefined): unknown {
  if (!(err instanceof QemuError)) return err;
  const stderr = typeof err.details['stderr'] === 'string' ? err.details['stderr'] : err.message;
  const reason =
    stderr
      .split('\n')
      .filter((l) => l.trim() !== '')
      .pop()
      ?.replace(/^qemu-img: /, '') ?? err.message;
  if (/No such file or directory/.test(stderr)) {
    return new NotFoundError(`cannot open ${path}: ${reason}`, { path }, { cause: err });
  }
  return new CorruptInputError(
    `cannot open ${path}${format ? ` as ${format}` : ''}: ${reason}`,
    { path },
    { cause: err },
  );
}

/**
 * Pieces for reading every range straight from the layer files, or null when some range holds
 * data qemu-img cannot point at (compressed, encrypted, other formats): then a converted view
 * is simpler and as fast.
 */
async function directPieces(
  entries: MapEntry[],
  chain: ImageInfo[],
): Promise<{ pieces: Piece[]; handles: FileHandle[] } | null> {
  const usable = chain.map(
    (i) => DIRECT_FORMATS.has(i.format) && !i.encrypted && i.dataFile === undefined && isPlainFile(i.filename),
  );
  const pieces: Piece[] = [];
  const used = new Set<number>();
  for (const e of entries) {
    if (!e.present || e.zero) {
      pieces.push({ start: e.start, length: e.length, file: -1, offset: 0 });
    } else if (e.offset !== undefined && !e.compressed && usable[e.depth]) {
      pieces.push({ start: e.start, length: e.length, file: e.depth, offset: e.offset });
      used.add(e.depth);
    } else {
      return null;
    }
  }
  const handles: FileHandle[] = [];
  const byDepth = new Map<number, number>();
  const sizes = new Map<number, number>();
  try {
    for (const depth of [...used].sort((a, b) => a - b)) {
      const layer = chain[depth];
      if (!layer) return null;
      byDepth.set(depth, handles.length);
      const h = await open(hostFilename(layer.filename), 'r');
      handles.push(h);
      sizes.set(depth, (await h.stat()).size);
    }
  } catch (err) {
    await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
    throw new NotFoundError(`cannot open a layer of the backing chain`, {}, { cause: err });
  }
  // Data a layer's map points at must be inside that layer's file: a truncated image is corrupt,
  // never read as zeros.
  for (const e of entries) {
    if (e.offset === undefined || !e.present || e.zero || !used.has(e.depth)) continue;
    if (e.offset + e.length > (sizes.get(e.depth) ?? 0)) {
      await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
      const layer = chain[e.depth]?.filename ?? '?';
      throw new CorruptInputError(`${layer} is truncated: data at ${e.offset} runs past its end`, { path: layer });
    }
  }
  for (const p of pieces) if (p.file >= 0) p.file = byDepth.get(p.file) ?? -1;
  return { pieces, handles };
}

/** `qemu-img convert -O raw` into a private temp dir; holes stay holes. */
async function convertedView(
  path: string,
  format: string,
  tmpDir: string,
): Promise<{ handle: FileHandle; remove: () => Promise<void> }> {
  // Owner-tagged: the view of a killed run is removed by the next one (util/atomic.ts stagingDir).
  const dir = await stagingDir(tmpDir, 'cloudlet-disk-');
  const removeDir = (): Promise<void> => rm(dir, { recursive: true, force: true });
  const unregister = onCleanup(removeDir);
  const remove = async (): Promise<void> => {
    unregister();
    await removeDir();
  };
  try {
    const file = join(dir, 'view.raw');
    await qemuImg.convert(path, file, { srcFormat: format, dstFormat: 'raw' });
    const handle = await open(file, 'r');
    return { handle, remove };
  } catch (err) {
    await remove();
    throw err instanceof QemuError ? asOpenError(err, path, format) : err;
  }
}

/** `qemu-img check` of every qcow2 layer that is a plain file; corruptions refuse the image. */
async function checkLayers(chain: readonly ImageInfo[]): Promise<void> {
  for (const layer of chain) {
    if (layer.format !== 'qcow2' || !isPlainFile(layer.filename)) continue;
    const file = hostFilename(layer.filename);
    const r = await qemuImg.check(file, 'qcow2').catch((err: unknown) => {
      throw asOpenError(err, file, 'qcow2');
    });
    if (r.corruptions > 0 || r.checkErrors > 0) {
      const first = r.messages.find((m) => /ERROR|corrupt/i.test(m)) ?? '';
      throw new CorruptInputError(
        `${file} is a damaged qcow2 image (qemu-img check: ${r.corruptions} corruptions, ${r.checkErrors} errors` +
          `${first ? `; ${first.slice(0, 200)}` : ''})`,
        { path: file },
      );
    }
  }
}

/** map must describe [0, size) without gaps; anything else means we misread its output. */
function checkCoverage(entries: MapEntry[], size: number, path: string): void {
  let pos = 0;
  for (const e of entries) {
    if (e.start !== pos || e.length < 0) {
      throw new QemuError(`qemu-img map of ${path} has a gap or overlap at ${pos}`, { path });
    }
    pos += e.length;
  }
  if (pos !== size) {
    throw new QemuError(`qemu-img map of ${path} covers ${pos} bytes, virtual size is ${size}`, { path });
  }
}

/** qemu's "json:{...}" and "proto:..." names are not files we can open ourselves. */
function isPlainFile(filename: string): boolean {
  return !/^[a-z0-9+.-]+:/i.test(filename) || filename.startsWith('file:');
}

function hostFilename(filename: string): string {
  if (!isPlainFile(filename)) return filename;
  return resolve(filename.startsWith('file:') ? filename.slice(5) : filename);
}
