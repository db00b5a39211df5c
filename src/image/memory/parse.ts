/**
 * One streaming pass over a QEMU 7.2 migration stream that indexes RAM pages instead of copying
 * them. Layout (docs/memory-stream.md): header, configuration, ram START (MEM_SIZE block list),
 * ram PART/END sections of page records, then everything from the first non-ram section on is
 * the opaque device-state tail. Every field is checked before it is trusted; anything we cannot
 * read faithfully is refused with the capability to turn off.
 */
import { CorruptInputError, UnsupportedError, check } from '../../util/errors.js';
import type { SnapshotBytes } from './snapshot-bytes.js';
import { readConfiguration, readPrintable, type Configuration } from './configuration.js';
import {
  FLAG_MASK,
  MAX_RAM_BYTES,
  RAM_SECTION_NAME,
  RAM_SECTION_VERSION,
  RamFlag,
  STREAM_MAGIC,
  STREAM_VERSION,
  STREAM_VERSION_COMPAT,
  Section,
} from './format.js';
import { PAGE_SIZE } from '../../util/page.js';
import { PageTable, fillEntry } from './page-table.js';
import { SequentialReader } from './reader.js';

/** Look-ahead that covers any record header: be64 + u8 + 255-byte block id + fill byte. */
const RECORD_LOOKAHEAD = 8 + 1 + 255 + 1;
/** Look-ahead that covers a section header: type + be32 + u8 + 255-byte idstr + 2 × be32. */
const SECTION_LOOKAHEAD = 1 + 4 + 1 + 255 + 8;
/** How much of the stream's end we read to find QEMU_VM_EOF and the vmdesc. */
const TAIL_CHECK_WINDOW = 16 * 1024 * 1024;

export interface BlockIndex {
  readonly name: string;
  /** used_length in bytes; a multiple of 4096. */
  readonly length: number;
  readonly pages: number;
  /** Guest-physical address, present only in streams with x-ignore-shared. */
  readonly address: number | null;
  readonly table: PageTable;
}

export interface Range {
  offset: number;
  length: number;
}

export interface RecordCounts {
  /** PAGE records (QEMU's "normal" counter). */
  page: number;
  /** ZERO records (QEMU's "duplicate" counter). */
  zero: number;
  /** Records for a page that had been sent before in the same stream (last copy wins). */
  repeated: number;
  /** ram sections (START + PARTs + END). */
  sections: number;
}

export interface StreamIndex {
  /** Where the QEVM header starts (0, or after a libvirt header). */
  streamOffset: number;
  streamEnd: number;
  config: Configuration;
  ramSectionId: number;
  /** Header + configuration: [streamOffset, startSection.offset). */
  prefix: Range;
  /** The exact ram START section, type byte to footer. */
  startSection: Range;
  blocks: BlockIndex[];
  /** From the first non-ram section to the end of the stream. */
  tail: Range;
  /** Whether the stream ends with QEMU_VM_EOF + a JSON vmdesc (else with QEMU_VM_EOF alone). */
  hasVmdesc: boolean;
  records: RecordCounts;
}

export interface ParseOptions {
  /** Stop after the START section and require it to end exactly at `end` (writer input checks). */
  headOnly?: boolean;
  /** Read size (default 8 MiB); tests use small ones to exercise refills at every boundary. */
  chunkSize?: number;
}

/** Parses [start, end) of `source` (end defaults to its size). */
export async function parseStream(
  source: SnapshotBytes,
  start = 0,
  end = source.size,
  options: ParseOptions = {},
): Promise<StreamIndex> {
  return new StreamParser(source, start, end, options.chunkSize).run(options);
}

interface SectionHeader {
  type: number;
  offset: number;
  sectionId: number;
  /** idstr, instance and version: START and FULL sections only. */
  name: string | null;
  instance: number;
  version: number;
}

class StreamParser {
  private readonly r: SequentialReader;
  private readonly byName = new Map<string, BlockIndex>();
  private readonly blocks: BlockIndex[] = [];
  /** The block of the previous ZERO/PAGE record: CONTINUE refers to it, across sections. */
  private last: BlockIndex | null = null;
  private readonly records: RecordCounts = { page: 0, zero: 0, repeated: 0, sections: 0 };
  private config: Configuration | null = null;

  constructor(
    private readonly source: SnapshotBytes,
    private readonly start: number,
    private readonly end: number,
    chunkSize?: number,
  ) {
    this.r = new SequentialReader(source, start, end, chunkSize);
  }

  async run(options: ParseOptions): Promise<StreamIndex> {
    const r = this.r;
    await this.readFileHeader();

    // Configuration and anything else up to the ram START.
    let startHeader: SectionHeader;
    for (;;) {
      await r.ensure(SECTION_LOOKAHEAD);
      const at = r.offset;
      const type = r.peek();
      if (type === Section.configuration) {
        check(this.config === null && at === this.start + 8, 'configuration section out of place', { offset: at });
        r.u8();
        this.config = await readConfiguration(r);
      } else if (type === Section.command) {
        this.refuseCommand();
      } else if (type === Section.start) {
        startHeader = this.readSectionHeader();
        if (startHeader.name === RAM_SECTION_NAME) break;
        refuseIterative(startHeader);
      } else if (type === Section.full || type === Section.eof) {
        throw new UnsupportedError('stream has no ram START section before its device state', { offset: at });
      } else if (type === -1) {
        throw new CorruptInputError(`memory snapshot truncated: stream ends at offset ${at} before any RAM`, {
          offset: at,
        });
      } else {
        throw new CorruptInputError(`expected a section at offset ${at}, found byte 0x${hex(type)}`, { offset: at });
      }
    }
    const config = this.config;
    if (config === null) {
      // savevm.c skips it only for machine types older than QEMU 2.x
      throw new UnsupportedError('stream has no configuration section (machine type too old)', {
        offset: startHeader.offset,
      });
    }
    if (startHeader.version !== RAM_SECTION_VERSION) {
      throw new UnsupportedError(`ram section version ${startHeader.version} (QEMU 7.2 writes 4)`, {
        offset: startHeader.offset,
        version: startHeader.version,
      });
    }
    const ramSectionId = startHeader.sectionId;

    await this.readMemSize(config);
    this.records.sections++;
    await this.readRecords();
    await this.readFooter(ramSectionId);
    const startSection = { offset: startHeader.offset, length: r.offset - startHeader.offset };
    const prefix = { offset: this.start, length: startHeader.offset - this.start };

    if (options.headOnly) {
      check(r.offset === this.end, 'bytes after the ram START section', { offset: r.offset });
      return this.result(config, ramSectionId, prefix, startSection, { offset: this.end, length: 0 }, false);
    }

    // ram PART/END sections until the first section of anything else.
    let tailOffset: number;
    for (;;) {
      await r.ensure(SECTION_LOOKAHEAD);
      const at = r.offset;
      const type = r.peek();
      if (type === Section.part || type === Section.end) {
        const h = this.readSectionHeader();
        // Another iterative handler (block migration, dirty bitmaps, VFIO) would have shown its
        // START section first, and been refused there: an unknown id here is corruption.
        check(h.sectionId === ramSectionId, `PART/END section for unknown section id ${h.sectionId}`, {
          offset: at,
          sectionId: h.sectionId,
        });
        this.records.sections++;
        await this.readRecords();
        await this.readFooter(ramSectionId);
      } else if (type === Section.full || type === Section.eof) {
        tailOffset = at;
        break;
      } else if (type === Section.start) {
        const h = this.readSectionHeader();
        check(h.name !== RAM_SECTION_NAME, 'second ram START section', { offset: at });
        refuseIterative(h);
      } else if (type === Section.command) {
        this.refuseCommand();
      } else if (type === -1) {
        throw new CorruptInputError(`memory snapshot truncated: stream ends at offset ${at} without device state`, {
          offset: at,
        });
      } else {
        throw new CorruptInputError(`expected a section at offset ${at}, found byte 0x${hex(type)}`, { offset: at });
      }
    }
    const hasVmdesc = await this.checkStreamEnd(tailOffset);
    const tail = { offset: tailOffset, length: this.end - tailOffset };
    return this.result(config, ramSectionId, prefix, startSection, tail, hasVmdesc);
  }

  private result(
    config: Configuration,
    ramSectionId: number,
    prefix: Range,
    startSection: Range,
    tail: Range,
    hasVmdesc: boolean,
  ): StreamIndex {
    return {
      streamOffset: this.start,
      streamEnd: this.end,
      config,
      ramSectionId,
      prefix,
      startSection,
      blocks: this.blocks,
      tail,
      hasVmdesc,
      records: this.records,
    };
  }

  private async readFileHeader(): Promise<void> {
    const r = this.r;
    await r.ensure(8);
    const magic = r.be32();
    check(magic === STREAM_MAGIC, 'not a QEMU migration stream (no QEVM magic)', {
      offset: this.start,
      magic: `0x${hex(magic)}`,
    });
    const version = r.be32();
    if (version === STREAM_VERSION_COMPAT) {
      throw new UnsupportedError('QEMU migration stream version 2 (QEMU < 1.0) is not supported', {
        offset: this.start + 4,
      });
    }
    check(version === STREAM_VERSION, `unknown QEMU migration stream version ${version}`, {
      offset: this.start + 4,
      version,
    });
  }

  /** Reads a section header; the caller has ensured SECTION_LOOKAHEAD bytes. */
  private readSectionHeader(): SectionHeader {
    const r = this.r;
    const offset = r.offset;
    const type = r.u8();
    const sectionId = r.be32();
    if (type !== Section.start && type !== Section.full) {
      return { type, offset, sectionId, name: null, instance: 0, version: 0 };
    }
    const name = readPrintable(r, r.u8(), 'section name');
    const instance = r.be32();
    const version = r.be32();
    return { type, offset, sectionId, name, instance, version };
  }

  private async readFooter(sectionId: number): Promise<void> {
    const r = this.r;
    await r.ensure(5);
    const at = r.offset;
    const marker = r.u8();
    check(marker === Section.footer, `missing section footer (0x7e) at offset ${at}`, {
      offset: at,
      found: `0x${hex(marker)}`,
    });
    const id = r.be32();
    check(id === sectionId, `section footer names section ${id}, expected ${sectionId}`, { offset: at });
  }

  /**
   * The MEM_SIZE record that opens the ram START section: be64 (total | 0x04), then per block
   * u8 len + idstr + be64 used_length (+ be64 guest address with x-ignore-shared), until the
   * lengths add up to the total.
   */
  private async readMemSize(config: Configuration): Promise<void> {
    const r = this.r;
    await r.ensure(8);
    const at = r.offset;
    const [hi, lo] = r.be64parts();
    const flags = lo & FLAG_MASK;
    check(flags === RamFlag.memSize, 'ram START section does not begin with the MEM_SIZE record', {
      offset: at,
      flags: `0x${hex(flags)}`,
    });
    const total = hi * 2 ** 32 + (lo - flags);
    check(total > 0 && total <= MAX_RAM_BYTES, 'MEM_SIZE: implausible total RAM size', { offset: at, total });
    const ignoreShared = config.capabilities.includes('x-ignore-shared');
    const hint = ' (streams written with postcopy-ram and huge pages carry fields we do not read)';

    let remaining = total;
    while (remaining > 0) {
      await r.ensure(1 + 255 + 8 + 8);
      const blockAt = r.offset;
      const name = readPrintable(r, r.u8(), 'RAM block name');
      const length = r.be64();
      check(
        length > 0 && length % PAGE_SIZE === 0 && length <= remaining,
        `MEM_SIZE: block ${name} has an invalid length ${length}${hint}`,
        { offset: blockAt, length, remaining },
      );
      check(!this.byName.has(name), `MEM_SIZE: block ${name} listed twice`, { offset: blockAt });
      let address: number | null = null;
      if (ignoreShared) address = r.be64();
      const pages = length / PAGE_SIZE;
      const block: BlockIndex = { name, length, pages, address, table: new PageTable(pages) };
      this.blocks.push(block);
      this.byName.set(name, block);
      remaining -= length;
    }
  }

  /** Records of one ram section up to and including EOS. The hot loop: no awaits per record. */
  private async readRecords(): Promise<void> {
    const r = this.r;
    const counts = this.records;
    for (;;) {
      if (r.buffered < RECORD_LOOKAHEAD) await r.ensure(RECORD_LOOKAHEAD);
      const at = r.offset;
      const [hi, lo] = r.be64parts();
      const flags = lo & FLAG_MASK;
      const addr = hi * 2 ** 32 + (lo - flags);
      if (flags === RamFlag.eos) {
        check(addr === 0, 'EOS record with a non-zero offset', { offset: at });
        return;
      }
      const kind = flags & ~RamFlag.continue;
      if (kind !== RamFlag.zero && kind !== RamFlag.page) refuseRecord(flags, at);

      let block: BlockIndex | null | undefined;
      if (flags & RamFlag.continue) {
        block = this.last;
        check(block !== null, 'CONTINUE record without a previous block', { offset: at });
      } else {
        const name = readPrintable(r, r.u8(), 'RAM block name');
        block = this.byName.get(name);
        check(block !== undefined, `record for RAM block ${name}, which MEM_SIZE did not list`, { offset: at });
        this.last = block;
      }
      check(addr < block.length, `record offset ${addr} outside RAM block ${block.name}`, {
        offset: at,
        block: block.name,
        blockOffset: addr,
        length: block.length,
      });
      const page = addr / PAGE_SIZE;
      let prev: number;
      if (kind === RamFlag.zero) {
        prev = block.table.set(page, fillEntry(r.u8()));
        counts.zero++;
      } else {
        const dataAt = r.offset;
        r.skip(PAGE_SIZE);
        prev = block.table.set(page, dataAt);
        counts.page++;
      }
      if (prev !== 0) counts.repeated++;
    }
  }

  private refuseCommand(): never {
    const r = this.r;
    const at = r.offset;
    r.u8();
    const cmd = r.be16();
    const what =
      cmd === 1
        ? 'return-path'
        : cmd === 3
          ? 'postcopy-ram (or dirty-bitmaps)'
          : 'postcopy-ram, return-path and x-colo';
    throw new UnsupportedError(`stream carries migration command ${cmd}: turn off the ${what} capability when saving`, {
      offset: at,
      command: cmd,
    });
  }

  /**
   * The stream must end with QEMU_VM_EOF, normally followed by 0x06 + be32 length + JSON vmdesc,
   * and QEMU_VM_EOF follows a section footer. This catches truncation inside the opaque tail,
   * which we cannot otherwise parse.
   */
  private async checkStreamEnd(tailOffset: number): Promise<boolean> {
    const from = Math.max(this.start, this.end - TAIL_CHECK_WINDOW, tailOffset - 5);
    const buf = Buffer.alloc(this.end - from);
    const got = await this.source.readAt(buf, 0, buf.length, from);
    check(got === buf.length, 'memory snapshot shrank while reading', { offset: from + got });
    const n = buf.length;
    const footerBefore = (eofAt: number): boolean => eofAt >= 5 && buf[eofAt - 5] === Section.footer;

    for (let p = n - 6; p >= 0; p--) {
      if (buf[p] !== Section.eof || buf[p + 1] !== Section.vmdescription) continue;
      if (buf.readUInt32BE(p + 2) !== n - p - 6) continue;
      if (from + p < tailOffset) break;
      const json = buf.subarray(p + 6);
      if (json.length > 0 && json[0] === 0x7b /* { */ && json[json.length - 1] === 0x7d /* } */ && footerBefore(p)) {
        return true;
      }
    }
    if (n > 0 && buf[n - 1] === Section.eof && from + n - 1 >= tailOffset && footerBefore(n - 1)) return false;
    throw new CorruptInputError(
      'memory snapshot truncated or garbled: the device state does not end with QEMU_VM_EOF (+ vmdesc)',
      { offset: this.end, tailOffset },
    );
  }
}

function refuseRecord(flags: number, at: number): never {
  const details = { offset: at, flags: `0x${hex(flags)}` };
  if (flags & RamFlag.xbzrle) {
    throw new UnsupportedError('stream uses XBZRLE page records: turn off the "xbzrle" migration capability', details);
  }
  if (flags & RamFlag.compressPage) {
    throw new UnsupportedError(
      'stream uses compressed page records: turn off the "compress" migration capability',
      details,
    );
  }
  if (flags & RamFlag.multifdFlush) {
    throw new UnsupportedError(
      'stream uses multifd records (QEMU ≥ 8): turn off the "multifd" migration capability',
      details,
    );
  }
  if (flags & RamFlag.hook) {
    throw new UnsupportedError('stream carries RDMA hook records: save with exec: or file:, not rdma:', details);
  }
  if (flags & RamFlag.memSize) {
    throw new CorruptInputError('MEM_SIZE record outside the ram START section', details);
  }
  throw new CorruptInputError(`unknown RAM record flags 0x${hex(flags)} at offset ${at}`, details);
}

function refuseIterative(h: SectionHeader): never {
  const hints: Record<string, string> = {
    block: 'block migration (migrate -b / -i, capability "block")',
    'dirty-bitmap': 'the "dirty-bitmaps" capability',
    vfio: 'VFIO device migration',
  };
  const name = h.name ?? '?';
  throw new UnsupportedError(
    `stream has an iterative section "${name}" besides RAM: turn off ${hints[name] ?? 'that feature'}`,
    { offset: h.offset, section: name },
  );
}

function hex(n: number): string {
  return n.toString(16).padStart(2, '0');
}
