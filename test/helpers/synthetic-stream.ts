/**
 * Hand-built migration-stream pieces, byte for byte as QEMU 7.2 lays them out. For tests (unit
 * tests of this parser, and other modules that need a memory snapshot without running QEMU);
 * production streams always come from QEMU or from MigrationStreamWriter.
 */
import {
  ConfigSubsection,
  RAM_SECTION_NAME,
  RAM_SECTION_VERSION,
  RamFlag,
  STREAM_MAGIC,
  STREAM_VERSION,
  Section,
} from '../../src/image/memory/format.js';
import { PAGE_SIZE } from '../../src/util/page.js';

export interface SyntheticBlock {
  name: string;
  length: number;
  /** Guest address, written only when x-ignore-shared is among the capabilities. */
  address?: number;
}

export interface HeaderOptions {
  machine?: string;
  capabilities?: string[];
  uuid?: Buffer;
}

function be32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n);
  return b;
}

function be64(n: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32BE(Math.floor(n / 2 ** 32));
  b.writeUInt32BE(n % 2 ** 32, 4);
  return b;
}

function name8(s: string): Buffer {
  const b = Buffer.from(s, 'latin1');
  return Buffer.concat([Buffer.of(b.length), b]);
}

/** QEVM header + configuration section (with the subsections asked for). */
export function streamHeader(opts: HeaderOptions = {}): Buffer {
  const machine = Buffer.from(opts.machine ?? 'pc-q35-7.2', 'latin1');
  const parts = [
    be32(STREAM_MAGIC),
    be32(STREAM_VERSION),
    Buffer.of(Section.configuration),
    be32(machine.length),
    machine,
  ];
  if (opts.capabilities !== undefined) {
    parts.push(
      Buffer.of(Section.subsection),
      name8(ConfigSubsection.capabilities),
      be32(1),
      be32(opts.capabilities.length),
    );
    for (const c of opts.capabilities) parts.push(name8(c));
  }
  if (opts.uuid !== undefined) {
    parts.push(Buffer.of(Section.subsection), name8(ConfigSubsection.uuid), be32(1), opts.uuid);
  }
  return Buffer.concat(parts);
}

/** One RAM record: be64 offset|flags, the block id unless CONTINUE (block null), payload. */
export function ramRecord(
  flags: number,
  offset: number,
  block: string | null,
  payload: Buffer = Buffer.alloc(0),
): Buffer {
  const f = flags | (block === null ? RamFlag.continue : 0);
  return Buffer.concat([be64(offset + f), block === null ? Buffer.alloc(0) : name8(block), payload]);
}

export function zeroRecord(block: string | null, page: number, fill = 0): Buffer {
  return ramRecord(RamFlag.zero, page * PAGE_SIZE, block, Buffer.of(fill));
}

export function pageRecord(block: string | null, page: number, data: Buffer): Buffer {
  if (data.length !== PAGE_SIZE) throw new RangeError('page data must be 4096 bytes');
  return ramRecord(RamFlag.page, page * PAGE_SIZE, block, data);
}

export function eosRecord(): Buffer {
  return be64(RamFlag.eos);
}

function footer(id: number): Buffer {
  return Buffer.concat([Buffer.of(Section.footer), be32(id)]);
}

/** ram START section: MEM_SIZE list, optional records, EOS, footer. */
export function ramStartSection(
  id: number,
  blocks: SyntheticBlock[],
  records: Buffer[] = [],
  ignoreShared = false,
): Buffer {
  const total = blocks.reduce((s, b) => s + b.length, 0);
  const parts = [
    Buffer.of(Section.start),
    be32(id),
    name8(RAM_SECTION_NAME),
    be32(0),
    be32(RAM_SECTION_VERSION),
    be64(total + RamFlag.memSize),
  ];
  for (const b of blocks) {
    parts.push(name8(b.name), be64(b.length));
    if (ignoreShared) parts.push(be64(b.address ?? 0));
  }
  parts.push(...records, eosRecord(), footer(id));
  return Buffer.concat(parts);
}

/** ram PART or END section around records. */
export function ramSection(type: 'part' | 'end', id: number, records: Buffer[]): Buffer {
  return Buffer.concat([
    Buffer.of(type === 'part' ? Section.part : Section.end),
    be32(id),
    ...records,
    eosRecord(),
    footer(id),
  ]);
}

/** A device-state tail: one FULL section with opaque bytes, EOF, and (by default) a vmdesc. */
export function deviceTail(opts: { sectionId?: number; vmdesc?: boolean; state?: Buffer } = {}): Buffer {
  const id = opts.sectionId ?? 7;
  const state = opts.state ?? Buffer.from('0123456789abcdef');
  const parts = [
    Buffer.of(Section.full),
    be32(id),
    name8('timer'),
    be32(0),
    be32(2),
    state,
    footer(id),
    Buffer.of(Section.eof),
  ];
  if (opts.vmdesc ?? true) {
    const json = Buffer.from('{"page_size": 4096, "devices": []}');
    parts.push(Buffer.of(Section.vmdescription), be32(json.length), json);
  }
  return Buffer.concat(parts);
}

/** A page whose every byte derives from (seed, page): distinguishable in failures. */
export function patternPage(seed: number, page: number): Buffer {
  const b = Buffer.alloc(PAGE_SIZE);
  let x = (seed * 2654435761 + page * 40503 + 1) >>> 0;
  for (let i = 0; i < PAGE_SIZE; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    b.writeUInt32LE(x, i);
  }
  return b;
}

export interface SampleStream {
  bytes: Buffer;
  blocks: SyntheticBlock[];
  ramSectionId: number;
  /** Expected contents of every block. */
  contents: Map<string, Buffer>;
  /** Where the device-state tail starts in `bytes`. */
  tailOffset: number;
}

/**
 * A small complete stream using every record kind QEMU 7.2 writes plus the corner cases the
 * parser must get right: data, zero and fill pages, CONTINUE across sections, a page sent twice
 * (the second copy wins), several blocks, a device tail with vmdesc.
 */
export function sampleStream(seed = 1): SampleStream {
  const id = 2;
  const blocks: SyntheticBlock[] = [
    { name: 'pc.ram', length: 64 * PAGE_SIZE },
    { name: 'pc.bios', length: 4 * PAGE_SIZE },
    { name: '/rom@etc/acpi/tables', length: 2 * PAGE_SIZE },
  ];
  const contents = new Map(blocks.map((b) => [b.name, Buffer.alloc(b.length)]));
  const put = (block: string, page: number, data: Buffer | number): void => {
    const dst = contents.get(block)!;
    if (typeof data === 'number') dst.fill(data, page * PAGE_SIZE, (page + 1) * PAGE_SIZE);
    else data.copy(dst, page * PAGE_SIZE);
  };

  const part1: Buffer[] = [];
  for (let p = 0; p < 64; p++) {
    const block = p === 0 ? 'pc.ram' : null;
    if (p % 5 === 1) {
      part1.push(pageRecord(block, p, patternPage(seed, p)));
      put('pc.ram', p, patternPage(seed, p));
    } else if (p === 7) {
      part1.push(zeroRecord(block, p, 0xab));
      put('pc.ram', p, 0xab);
    } else {
      part1.push(zeroRecord(block, p));
    }
  }
  // CONTINUE across sections: the first record of the next section reuses pc.ram.
  const part2 = [
    pageRecord(null, 3, patternPage(seed, 1003)),
    zeroRecord('pc.bios', 0),
    pageRecord(null, 1, patternPage(seed, 2001)),
  ];
  put('pc.ram', 3, patternPage(seed, 1003));
  put('pc.bios', 1, patternPage(seed, 2001));
  const end = [
    pageRecord(null, 2, patternPage(seed, 2002)),
    zeroRecord(null, 3),
    pageRecord('/rom@etc/acpi/tables', 0, patternPage(seed, 3000)),
    zeroRecord(null, 1),
    // pc.ram page 6 was data in part 1: now zero (last copy wins); page 11 data again.
    zeroRecord('pc.ram', 6),
    pageRecord(null, 11, patternPage(seed, 1011)),
  ];
  put('pc.bios', 2, patternPage(seed, 2002));
  put('/rom@etc/acpi/tables', 0, patternPage(seed, 3000));
  put('pc.ram', 6, 0);
  put('pc.ram', 11, patternPage(seed, 1011));

  const head = Buffer.concat([
    streamHeader(),
    ramStartSection(id, blocks),
    ramSection('part', id, part1),
    ramSection('part', id, part2),
    ramSection('end', id, end),
  ]);
  const bytes = Buffer.concat([head, deviceTail()]);
  return { bytes, blocks, ramSectionId: id, contents, tailOffset: head.length };
}
