/**
 * A memory snapshot opened for reading: a raw QEMU 7.2 migration stream or a libvirt
 * `virsh save` image around one. Opening streams the whole file once to index every RAM page
 * (file offset, zero/fill byte, or never sent); afterwards blocks are read page by page from the
 * file, so memory use is ~8 bytes per 4 KiB of guest RAM whatever the snapshot's size.
 */
import type { ChunkSource } from '../../delta/source.js';
import { CloudletError, CorruptInputError, NotFoundError, UnsupportedError } from '../../util/errors.js';
import { BlockSource } from './block-source.js';
import { BufferSnapshotBytes, FileSnapshotBytes, type SnapshotBytes } from './snapshot-bytes.js';
import { readLibvirtHeader, type LibvirtSaveHeader } from './libvirt.js';
import type { PageStates } from './page-table.js';
import { parseStream, type BlockIndex, type Range, type RecordCounts, type StreamIndex } from './parse.js';

/** Largest device-state tail tail() returns as one Buffer. */
const MAX_TAIL_BYTES = 1024 * 1024 * 1024;

export interface BlockInfo {
  readonly name: string;
  /** Bytes; a multiple of 4096. */
  readonly length: number;
  readonly pages: number;
}

export interface MemorySnapshot {
  /** The file, or null for an in-memory snapshot. */
  readonly path: string | null;
  /** From the configuration section, e.g. "pc-q35-7.2". */
  readonly machineType: string;
  /** Capabilities the configuration section lists (only "validated" ones, e.g. x-ignore-shared). */
  readonly capabilities: readonly string[];
  /** The libvirt header when the file is a `virsh save` image. */
  readonly libvirt: LibvirtSaveHeader | null;
  /** RAM blocks in stream (MEM_SIZE) order. */
  readonly blocks: readonly BlockInfo[];
  /** Section id of the ram handler; the writer reuses it. */
  readonly ramSectionId: number;
  /** Where the QEMU stream starts in the file (non-zero inside a libvirt image). */
  readonly streamOffset: number;
  /** File range of the opaque device-state tail. */
  readonly tailRange: Range;
  readonly hasVmdesc: boolean;
  readonly records: RecordCounts;
  /** One block as a ChunkSource; pages never sent read as zero. */
  block(name: string): ChunkSource;
  /** Per-page state of one block for fast iteration. */
  pages(name: string): PageStates;
  /** Header + configuration: everything before the ram START section. */
  prefixBytes(): Promise<Buffer>;
  /** The exact ram START section (MEM_SIZE list, EOS, footer). */
  startSectionBytes(): Promise<Buffer>;
  /** The device-state tail (small: device registers, not RAM). */
  tail(): Promise<Buffer>;
  /** Throws UnsupportedError unless every page of every block was sent (a full snapshot). */
  assertComplete(): void;
  close(): Promise<void>;
}

/** Opens and indexes a snapshot file. Errors: NotFoundError, CorruptInputError, UnsupportedError. */
export async function openMemorySnapshot(path: string): Promise<MemorySnapshot> {
  const source = await FileSnapshotBytes.open(path);
  try {
    return await indexSnapshot(source, path);
  } catch (err) {
    await source.close();
    throw err;
  }
}

/**
 * Same as openMemorySnapshot over bytes in memory (tests, fuzzing, small synthetic streams).
 * `chunkSize` sets the parser's read size (tests: small reads exercise every buffer boundary).
 */
export async function memorySnapshotFromBuffer(
  data: Buffer,
  options: { chunkSize?: number } = {},
): Promise<MemorySnapshot> {
  return indexSnapshot(new BufferSnapshotBytes(data), null, options.chunkSize);
}

async function indexSnapshot(source: SnapshotBytes, path: string | null, chunkSize?: number): Promise<MemorySnapshot> {
  const libvirt = await readLibvirtHeader(source);
  const options = chunkSize === undefined ? {} : { chunkSize };
  const index = await parseStream(source, libvirt?.streamOffset ?? 0, source.size, options);
  return new Snapshot(source, path, libvirt, index);
}

class Snapshot implements MemorySnapshot {
  readonly machineType: string;
  readonly capabilities: readonly string[];
  readonly blocks: readonly BlockInfo[];
  readonly ramSectionId: number;
  readonly streamOffset: number;
  readonly tailRange: Range;
  readonly hasVmdesc: boolean;
  readonly records: RecordCounts;
  private readonly byName: Map<string, BlockIndex>;
  private closed = false;

  constructor(
    private readonly source: SnapshotBytes,
    readonly path: string | null,
    readonly libvirt: LibvirtSaveHeader | null,
    private readonly index: StreamIndex,
  ) {
    this.machineType = index.config.machineType;
    this.capabilities = index.config.capabilities;
    this.blocks = index.blocks.map((b) => ({ name: b.name, length: b.length, pages: b.pages }));
    this.ramSectionId = index.ramSectionId;
    this.streamOffset = index.streamOffset;
    this.tailRange = index.tail;
    this.hasVmdesc = index.hasVmdesc;
    this.records = index.records;
    this.byName = new Map(index.blocks.map((b) => [b.name, b]));
  }

  block(name: string): ChunkSource {
    return new BlockSource(name, this.find(name).table, this.source);
  }

  pages(name: string): PageStates {
    return this.find(name).table;
  }

  prefixBytes(): Promise<Buffer> {
    return this.readRange(this.index.prefix);
  }

  startSectionBytes(): Promise<Buffer> {
    return this.readRange(this.index.startSection);
  }

  tail(): Promise<Buffer> {
    if (this.tailRange.length > MAX_TAIL_BYTES) {
      throw new UnsupportedError('device-state tail larger than 1 GiB', { length: this.tailRange.length });
    }
    return this.readRange(this.tailRange);
  }

  assertComplete(): void {
    for (const b of this.index.blocks) {
      const unsent = b.table.counts().unsent;
      if (unsent > 0) {
        throw new UnsupportedError(
          `RAM block ${b.name}: ${unsent} of ${b.pages} pages are not in the stream ` +
            '(x-ignore-shared or multifd in use, or a sparse stream): a full snapshot is needed',
          { block: b.name, unsent, pages: b.pages },
        );
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.source.close();
  }

  private find(name: string): BlockIndex {
    const b = this.byName.get(name);
    if (b === undefined) {
      throw new NotFoundError(`memory snapshot has no RAM block ${name}`, {
        block: name,
        blocks: this.blocks.map((x) => x.name),
      });
    }
    return b;
  }

  private async readRange(range: Range): Promise<Buffer> {
    if (this.closed) throw new CloudletError('memory snapshot is closed', { path: this.path });
    const buf = Buffer.alloc(range.length);
    const got = await this.source.readAt(buf, 0, range.length, range.offset);
    if (got !== range.length) {
      throw new CorruptInputError('memory snapshot shrank while reading', { offset: range.offset + got });
    }
    return buf;
  }
}
