/**
 * Writes a QEMU 7.2 migration stream QEMU can load with `-incoming`: a prefix (header +
 * configuration) and ram START section taken from a real stream, then one ram END section with
 * the page records given to writePage(), EOS, footer, and the original device-state tail.
 * QEMU accepts pages in any order and lets a later copy of a page win; records reuse the
 * previous record's block through CONTINUE exactly as ram.c does. It writes to a sink: a file
 * that appears atomically, or a socket into a QEMU waiting for it (stream-sink.ts).
 */
import { fileSink, type StreamSink } from './stream-sink.js';
import type { AtomicOptions } from '../../util/atomic.js';
import { CloudletError, check } from '../../util/errors.js';
import { BufferSnapshotBytes } from './snapshot-bytes.js';
import { RamFlag, Section } from './format.js';
import { PAGE_SIZE } from '../../util/page.js';
import { parseStream } from './parse.js';

const OUT_BUFFER = 8 * 1024 * 1024;
const ZERO = Buffer.alloc(PAGE_SIZE);

interface WriterBlock {
  name: string;
  pages: number;
  /** u8 length + idstr, written when a record does not CONTINUE. */
  id: Buffer;
}

export interface WriterStats {
  /** PAGE records written. */
  dataPages: number;
  /** ZERO records written. */
  zeroPages: number;
  /** Size of the stream written. */
  bytes: number;
}

type State = 'new' | 'open' | 'done' | 'failed';

export class MigrationStreamWriter {
  private state: State = 'new';
  private file: StreamSink | null = null;
  private out: Buffer = Buffer.allocUnsafe(OUT_BUFFER);
  /**
   * Buffers being written, oldest first, up to `depth`: pages keep coming while a slow reader
   * (a QEMU loading them) catches up; a buffer returns to `free` once its write is done.
   */
  private readonly inflight: Array<Promise<void>> = [];
  private readonly free: Buffer[] = [];
  private used = 0;
  private position = 0;
  private readonly blocks = new Map<string, WriterBlock>();
  private last: WriterBlock | null = null;
  private ramSectionId = 0;
  private readonly stats: WriterStats = { dataPages: 0, zeroPages: 0, bytes: 0 };

  /**
   * `to`: a file path (written atomically) or a sink. `depth`: buffers of 8 MiB in flight at
   * most (default 2; a socket into QEMU takes more, so that rebuilding need not wait for QEMU).
   */
  constructor(
    private readonly to: string | StreamSink,
    private readonly options: AtomicOptions & { depth?: number } = {},
  ) {}

  get path(): string {
    return typeof this.to === 'string' ? this.to : this.to.name;
  }

  /**
   * Starts the stream. `prefix` and `startSection` are MemorySnapshot.prefixBytes() and
   * startSectionBytes() of the snapshot whose machine and devices the stream describes; they
   * are parsed again here so a wrong pair fails now rather than inside QEMU.
   */
  async begin(prefix: Buffer, startSection: Buffer, ramSectionId: number): Promise<void> {
    if (this.state !== 'new') throw new CloudletError('MigrationStreamWriter.begin called twice');
    const head = Buffer.concat([prefix, startSection]);
    const index = await parseStream(new BufferSnapshotBytes(head), 0, head.length, { headOnly: true });
    check(
      index.startSection.offset === prefix.length,
      'stream prefix does not end where the ram START section begins',
      {
        offset: index.startSection.offset,
      },
    );
    check(index.ramSectionId === ramSectionId, 'ram section id does not match the START section', {
      expected: ramSectionId,
      found: index.ramSectionId,
    });
    check(index.records.page + index.records.zero === 0, 'ram START section carries page records', {});
    for (const b of index.blocks) {
      const name = Buffer.from(b.name, 'latin1');
      this.blocks.set(b.name, { name: b.name, pages: b.pages, id: Buffer.concat([Buffer.of(name.length), name]) });
    }
    this.ramSectionId = ramSectionId;

    this.file = typeof this.to === 'string' ? await fileSink(this.to, this.options) : this.to;
    this.state = 'open';
    await this.guard(async () => {
      await this.put(head);
      const h = Buffer.alloc(5);
      h[0] = Section.end;
      h.writeUInt32BE(ramSectionId, 1);
      await this.put(h);
    });
  }

  /** Adds one page; `data` null (or all zero) becomes a ZERO record. */
  async writePage(blockName: string, pageIndex: number, data: Buffer | null): Promise<void> {
    if (this.state !== 'open') throw new CloudletError(`MigrationStreamWriter.writePage in state ${this.state}`);
    const block = this.blocks.get(blockName);
    if (block === undefined) throw new CloudletError(`stream has no RAM block ${blockName}`, { block: blockName });
    if (!Number.isInteger(pageIndex) || pageIndex < 0 || pageIndex >= block.pages) {
      throw new CloudletError(`page ${pageIndex} outside RAM block ${blockName}`, { block: blockName, pageIndex });
    }
    if (data !== null && data.length !== PAGE_SIZE) {
      throw new CloudletError(`page data must be ${PAGE_SIZE} bytes`, { length: data.length });
    }
    const zero = data === null || data.equals(ZERO);
    if (this.used + 8 + 256 + PAGE_SIZE > this.out.length) await this.guard(() => this.flush());

    const cont = block === this.last;
    const offset = pageIndex * PAGE_SIZE;
    const flags = (zero ? RamFlag.zero : RamFlag.page) | (cont ? RamFlag.continue : 0);
    this.out.writeUInt32BE(Math.floor(offset / 2 ** 32), this.used);
    this.out.writeUInt32BE((offset % 2 ** 32) + flags, this.used + 4);
    this.used += 8;
    if (!cont) {
      this.used += block.id.copy(this.out, this.used);
      this.last = block;
    }
    if (zero) {
      this.out[this.used++] = 0;
      this.stats.zeroPages++;
    } else {
      this.used += data.copy(this.out, this.used);
      this.stats.dataPages++;
    }
  }

  /** Sends every page given so far on to the sink (a QEMU loading it can go on meanwhile). */
  async push(): Promise<void> {
    if (this.state !== 'open') throw new CloudletError(`MigrationStreamWriter.push in state ${this.state}`);
    await this.guard(async () => {
      await this.flush();
      await Promise.all(this.inflight);
    });
  }

  /** Ends the ram section, appends the device-state tail unchanged, and commits the file. */
  async finish(tail: Buffer): Promise<WriterStats> {
    if (this.state !== 'open') throw new CloudletError(`MigrationStreamWriter.finish in state ${this.state}`);
    const first = tail[0];
    check(first === Section.full || first === Section.eof, 'device-state tail must start with a FULL section or EOF', {
      first: first ?? -1,
    });
    await this.guard(async () => {
      const end = Buffer.alloc(8 + 5);
      end.writeUInt32BE(RamFlag.eos, 4);
      end[8] = Section.footer;
      end.writeUInt32BE(this.ramSectionId, 9);
      await this.put(end);
      await this.put(tail);
      await this.flush();
      await Promise.all(this.inflight);
      await this.openFile().commit();
    });
    this.state = 'done';
    this.stats.bytes = this.position;
    return { ...this.stats };
  }

  /** Drops the temporary file; safe to call in any state. */
  async abort(): Promise<void> {
    if (this.state === 'done') return;
    this.state = 'failed';
    await this.file?.abort();
  }

  /** After the first I/O error the writer refuses further use and removes its temporary file. */
  private async guard(fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  private async put(data: Buffer): Promise<void> {
    if (this.used + data.length > this.out.length) await this.flush();
    if (data.length > this.out.length) {
      await Promise.all(this.inflight);
      await this.writeAt(data, this.position);
      this.position += data.length;
      return;
    }
    this.used += data.copy(this.out, this.used);
  }

  /** Starts writing the filled buffer and takes a free one; waits only when `depth` are in flight. */
  private async flush(): Promise<void> {
    if (this.used === 0) return;
    if (this.inflight.length >= (this.options.depth ?? 2)) await this.inflight[0];
    const buf = this.out;
    const write = this.writeAt(buf.subarray(0, this.used), this.position).then(() => {
      void this.inflight.splice(this.inflight.indexOf(write), 1);
      this.free.push(buf);
    });
    write.catch(() => undefined); // awaited later (next flush or finish); not unhandled meanwhile
    this.inflight.push(write);
    this.position += this.used;
    this.out = this.free.pop() ?? Buffer.allocUnsafe(OUT_BUFFER);
    this.used = 0;
  }

  /** The output file; only called between begin() and finish(). */
  private openFile(): StreamSink {
    if (!this.file) throw new CloudletError('MigrationStreamWriter used before begin()');
    return this.file;
  }

  private async writeAt(data: Buffer, position: number): Promise<void> {
    await this.openFile().write(data, position);
  }
}
