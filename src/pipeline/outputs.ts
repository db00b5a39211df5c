/**
 * Where the assembler's rebuilt targets go: a disk writer (qcow2 over the base disk, or raw),
 * a migration stream shared by the RAM blocks (a file, or a socket into a waiting QEMU), or a
 * raw file per RAM block. Adapters from AssemblyOutput to src/image's writers.
 */
import { open, type FileHandle } from 'node:fs/promises';
import type { AssemblyOutput } from '../delta/assemble.js';
import { CHUNK_SIZE, chunkLength } from '../delta/chunk.js';
import type { DiskWriter } from '../image/disk/writer.js';
import { writeFully } from '../image/disk/io.js';
import type { MigrationStreamWriter } from '../image/memory/writer.js';
import type { BlobLookup } from './rebuild.js';

/** A disk writer takes changed chunks in ascending order. */
export class DiskChunks implements AssemblyOutput {
  readonly everyChunk = false;
  readonly ordered = true;
  constructor(
    private readonly writer: DiskWriter,
    private readonly size: number,
  ) {}

  async put(index: number, data: Buffer | null): Promise<void> {
    const off = index * CHUNK_SIZE;
    if (data) await this.writer.writeChunk(off, data);
    else await this.writer.zeroChunk(off, chunkLength(this.size, index));
  }

  async finish(): Promise<void> {
    await this.writer.finish();
  }
}

/**
 * One migration stream for all RAM blocks: begun when the first page comes (the stream's
 * header and RAM setup are blobs assembled before any page), ended by end() with the device
 * state — which a caller feeding QEMU sends only once everything is proven.
 */
export class SharedStream {
  private begun = false;

  constructor(
    readonly writer: MigrationStreamWriter,
    private readonly blob: BlobLookup,
    private readonly ramSectionId: number,
    private readonly names: { prefix: string; start: string; tail: string },
  ) {}

  async begin(): Promise<void> {
    if (this.begun) return;
    this.begun = true;
    await this.writer.begin(this.blob(this.names.prefix), this.blob(this.names.start), this.ramSectionId);
  }

  /** Sends what is buffered (QEMU loads it meanwhile). */
  async push(): Promise<void> {
    await this.begin();
    await this.writer.push();
  }

  async end(): Promise<void> {
    await this.begin();
    await this.writer.finish(this.blob(this.names.tail));
  }

  async abort(): Promise<void> {
    await this.writer.abort();
  }
}

/**
 * One RAM block into the shared stream. `everyChunk` false: only pages that differ from the
 * base (the main block, resumed over the base RAM file); true: every page (ROM blocks, which
 * QEMU does not refill on incoming, and full streams).
 */
export class StreamBlock implements AssemblyOutput {
  readonly ordered = false;
  constructor(
    private readonly stream: SharedStream,
    private readonly block: string,
    readonly everyChunk: boolean,
  ) {}

  async put(index: number, data: Buffer | null): Promise<void> {
    await this.stream.begin();
    await this.stream.writer.writePage(this.block, index, data);
  }

  async finish(): Promise<void> {
    await this.stream.push();
  }
}

/** A RAM block as a raw file: every page at its offset, zero pages left as holes. */
export class RawRamFile implements AssemblyOutput {
  readonly everyChunk = true;
  readonly ordered = false;
  private fh: FileHandle | undefined;

  constructor(
    private readonly path: string,
    private readonly size: number,
    private readonly durable = true,
  ) {}

  async put(index: number, data: Buffer | null): Promise<void> {
    this.fh ??= await open(this.path, 'wx');
    if (data) await writeFully(this.fh, data, index * CHUNK_SIZE);
  }

  async finish(): Promise<void> {
    this.fh ??= await open(this.path, 'wx');
    await this.fh.truncate(this.size);
    if (this.durable) await this.fh.sync();
    await this.fh.close();
    this.fh = undefined;
  }

  async abort(): Promise<void> {
    await this.fh?.close().catch(() => undefined);
  }
}
