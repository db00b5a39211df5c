/**
 * Where apply puts rebuilt targets: adapters from the patcher's TargetOutput to the disk
 * writers (qcow2 over the base, or raw) and to memory outputs (sparse stream over the base RAM
 * file, full stream, or raw files per RAM block).
 */
import { open, type FileHandle } from 'node:fs/promises';
import { durable } from '../util/atomic.js';
import { CHUNK_SIZE, chunkLength } from '../delta/chunk.js';
import type { TargetOutput } from '../delta/patch.js';
import type { DiskWriter } from '../image/disk/writer.js';
import type { MigrationStreamWriter } from '../image/memory/writer.js';

export class DiskOutput implements TargetOutput {
  readonly wantsAll = false;
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
 * One RAM block into a migration stream shared by all blocks. `wantsAll` false writes only the
 * pages that differ from the base (the sparse stream's main block); true writes every page.
 */
export class StreamBlockOutput implements TargetOutput {
  constructor(
    private readonly stream: SharedStream,
    private readonly block: string,
    readonly wantsAll: boolean,
  ) {}

  async put(index: number, data: Buffer | null): Promise<void> {
    await this.stream.begin();
    await this.stream.writer.writePage(this.block, index, data);
  }

  async finish(): Promise<void> {
    await this.stream.blockDone();
  }
}

/** A stream writer begun lazily (the header blobs are rebuilt first) and finished after its last block. */
export class SharedStream {
  private begun = false;
  private pending: number;

  constructor(
    readonly writer: MigrationStreamWriter,
    blocks: number,
    private readonly blob: (name: string) => Buffer,
    private readonly ramSectionId: number,
    private readonly names: { prefix: string; start: string; tail: string },
  ) {
    this.pending = blocks;
  }

  async begin(): Promise<void> {
    if (this.begun) return;
    this.begun = true;
    await this.writer.begin(this.blob(this.names.prefix), this.blob(this.names.start), this.ramSectionId);
  }

  async blockDone(): Promise<void> {
    if (--this.pending > 0) return;
    await this.begin();
    await this.writer.finish(this.blob(this.names.tail));
  }
}

/** A RAM block as a raw file: every page written, zero pages left as holes. */
export class RawFileOutput implements TargetOutput {
  readonly wantsAll = true;
  private fh: FileHandle | undefined;

  constructor(
    private readonly path: string,
    private readonly size: number,
  ) {}

  async put(index: number, data: Buffer | null): Promise<void> {
    this.fh ??= await open(this.path, 'w');
    if (data) await this.fh.write(data, 0, data.length, index * CHUNK_SIZE);
  }

  async finish(): Promise<void> {
    this.fh ??= await open(this.path, 'w');
    await this.fh.truncate(this.size);
    if (durable()) await this.fh.sync();
    await this.fh.close();
  }

  async abort(): Promise<void> {
    await this.fh?.close().catch(() => undefined);
  }
}
