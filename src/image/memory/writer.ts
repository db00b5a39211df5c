/**
 * Writes a QEMU 7.2 migration stream QEMU can load with `-incoming`: a prefix (header +
 * configuration) and ram START section taken from a real stream, then one ram END section with
 * the page records given to writePage(), EOS, footer, and the original device-state tail.
 * QEMU accepts pages in any order and lets a later copy of a page win; records reuse the
 * previous record's block through CONTINUE exactly as ram.c does. The file appears atomically.
 */
import { AtomicFile } from '../../util/atomic.js';
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
  private file: AtomicFile | null = null;
  private out = Buffer.allocUnsafe(OUT_BUFFER);
  /** Double buffering: one buffer fills while the other is being written. */
  private spare = Buffer.allocUnsafe(OUT_BUFFER);
  private inflight: Promise<void> | null = null;
  private used = 0;
  private position = 0;
  private readonly blocks = new Map<string, WriterBlock>();
  private last: WriterBlock | null = null;
  private ramSectionId = 0;
  private readonly stats: WriterStats = { dataPages: 0, zeroPages: 0, bytes: 0 };

  constructor(readonly path: string) {}

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

    this.file = await AtomicFile.create(this.path);
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
      await this.inflight;
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
      await this.inflight;
      await this.writeAt(data, this.position);
      this.position += data.length;
      return;
    }
    this.used += data.copy(this.out, this.used);
  }

  /** Starts writing the filled buffer and swaps in the other one; pages keep coming meanwhile. */
  private async flush(): Promise<void> {
    if (this.used === 0) return;
    await this.inflight; // the spare buffer is free again
    const write = this.writeAt(this.out.subarray(0, this.used), this.position);
    write.catch(() => undefined); // awaited later (next flush or finish); not unhandled meanwhile
    this.inflight = write;
    this.position += this.used;
    [this.out, this.spare] = [this.spare, this.out];
    this.used = 0;
  }

  /** The output file; only called between begin() and finish(). */
  private openFile(): AtomicFile {
    if (!this.file) throw new CloudletError('MigrationStreamWriter used before begin()');
    return this.file;
  }

  private async writeAt(data: Buffer, position: number): Promise<void> {
    const handle = this.openFile().handle;
    for (let done = 0; done < data.length;) {
      const { bytesWritten } = await handle.write(data, done, data.length - done, position + done);
      done += bytesWritten;
    }
  }
}
