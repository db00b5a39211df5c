/**
 * The migration-stream parser on hand-built streams: every record kind, CONTINUE across
 * sections, last copy wins, libvirt wrapping, and refusal of what we cannot read faithfully —
 * each with the right error class and the byte offset.
 */
import { describe, it } from 'node:test';
import assert from 'node:assert/strict';
import { memorySnapshotFromBuffer, type MemorySnapshot } from '../../src/image/memory/index.js';
import { buildLibvirtHeader } from '../../src/image/memory/libvirt.js';
import { RamFlag } from '../../src/image/memory/format.js';
import {
  deviceTail,
  pageRecord,
  patternPage,
  ramRecord,
  ramSection,
  ramStartSection,
  sampleStream,
  streamHeader,
  zeroRecord,
  type SyntheticBlock,
} from '../helpers/synthetic-stream.js';
import type { CloudletError } from '../../src/util/errors.js';
import { CorruptInputError, NotFoundError, UnsupportedError } from '../../src/util/errors.js';

const PAGE = 4096;

async function blockBytes(s: MemorySnapshot, name: string): Promise<Buffer> {
  const src = s.block(name);
  const buf = Buffer.alloc(src.size);
  await src.read(0, src.size, buf);
  return buf;
}

/** Asserts that parsing `bytes` fails with `cls`, and that the error names a byte offset. */
async function rejects(bytes: Buffer, cls: typeof CloudletError, pattern?: RegExp): Promise<CloudletError> {
  try {
    await memorySnapshotFromBuffer(bytes);
  } catch (err) {
    assert.ok(err instanceof cls, `expected ${cls.name}, got ${String(err)}`);
    if (pattern) assert.match(err.message, pattern);
    assert.equal(typeof err.details.offset, 'number', `no offset in ${JSON.stringify(err.details)}`);
    return err;
  }
  assert.fail(`parsing succeeded, expected ${cls.name}`);
}

const BLOCKS: SyntheticBlock[] = [
  { name: 'pc.ram', length: 8 * PAGE },
  { name: 'pc.bios', length: 2 * PAGE },
];

/** A complete two-block stream with extra records spliced into one PART section. */
function stream(records: Buffer[], opts: { start?: Buffer; tail?: Buffer } = {}): Buffer {
  const fill: Buffer[] = [zeroRecord('pc.ram', 0)];
  for (let p = 1; p < 8; p++) fill.push(zeroRecord(null, p));
  fill.push(zeroRecord('pc.bios', 0), zeroRecord(null, 1));
  return Buffer.concat([
    streamHeader(),
    opts.start ?? ramStartSection(2, BLOCKS),
    ramSection('part', 2, fill),
    ramSection('end', 2, records),
    opts.tail ?? deviceTail(),
  ]);
}

describe('memory stream parser', () => {
  it('indexes every record kind of the sample stream and reads blocks back exactly', async () => {
    const sample = sampleStream();
    const s = await memorySnapshotFromBuffer(sample.bytes);
    assert.equal(s.machineType, 'pc-q35-7.2');
    assert.deepEqual(s.capabilities, []);
    assert.equal(s.ramSectionId, 2);
    assert.deepEqual(
      s.blocks.map((b) => [b.name, b.length, b.pages]),
      sample.blocks.map((b) => [b.name, b.length, b.length / PAGE]),
    );
    for (const [name, expected] of sample.contents) {
      assert.ok((await blockBytes(s, name)).equals(expected), `block ${name}`);
    }
    s.assertComplete();
    assert.equal(s.hasVmdesc, true);
    assert.deepEqual(s.tailRange, { offset: sample.tailOffset, length: sample.bytes.length - sample.tailOffset });
    assert.ok((await s.tail()).equals(sample.bytes.subarray(sample.tailOffset)));
    // 13 data pages in part 1, 2 in part 2, 3 in end; pc.ram pages 3, 6 and 11 were sent twice.
    assert.equal(s.records.page, 13 + 2 + 3);
    assert.equal(s.records.repeated, 3);
  });

  it('gives the same index whatever the read size (refills at every record boundary)', async () => {
    const sample = sampleStream(9);
    const ref = await memorySnapshotFromBuffer(sample.bytes);
    for (const chunkSize of [1024, 1031, 4096 + 9, 65536]) {
      const s = await memorySnapshotFromBuffer(sample.bytes, { chunkSize });
      assert.deepEqual(s.records, ref.records, `chunk ${chunkSize}`);
      assert.deepEqual(s.tailRange, ref.tailRange);
      for (const b of ref.blocks) {
        for (let p = 0; p < b.pages; p++) assert.equal(s.pages(b.name).entry(p), ref.pages(b.name).entry(p));
      }
    }
  });

  it('exposes per-page state: data, zero, fill byte, never sent', async () => {
    const sample = sampleStream();
    const s = await memorySnapshotFromBuffer(sample.bytes);
    const ram = s.pages('pc.ram');
    assert.equal(ram.pages, 64);
    assert.equal(ram.isData(1), true);
    assert.equal(typeof ram.dataOffset(1), 'number');
    assert.equal(ram.isZero(0), true);
    assert.equal(ram.fillByte(0), 0);
    assert.equal(ram.fillByte(7), 0xab);
    assert.equal(ram.isZero(7), false);
    assert.equal(ram.isData(6), false, 'page 6: a later ZERO record wins over the earlier PAGE');
    assert.equal(ram.isData(3), true, 'page 3: a later PAGE record wins over the earlier ZERO');
    const c = ram.counts();
    assert.deepEqual(c, { data: 13, zero: 50, fill: 1, unsent: 0 });
    const offset = ram.dataOffset(11)!;
    assert.ok(sample.bytes.subarray(offset, offset + PAGE).equals(patternPage(1, 1011)), 'page 11: last copy');
  });

  it('reads unaligned ranges, ranges past the end (zero), and reports data extents', async () => {
    const sample = sampleStream();
    const s = await memorySnapshotFromBuffer(sample.bytes);
    const ram = s.block('pc.ram');
    const expected = sample.contents.get('pc.ram')!;
    for (const [off, len] of [
      [1, 10],
      [PAGE - 3, 9000],
      [5 * PAGE + 17, 3 * PAGE],
      [63 * PAGE + 100, 8000],
    ] as const) {
      const buf = Buffer.alloc(len, 0x55);
      await ram.read(off, len, buf);
      const want = Buffer.alloc(len);
      expected.copy(want, 0, off, Math.min(off + len, expected.length));
      assert.ok(buf.equals(want), `read(${off}, ${len})`);
    }
    const extents = await ram.dataExtents();
    let pos = 0;
    for (const e of extents) {
      assert.ok(e.start >= pos && e.length > 0);
      assert.ok(expected.subarray(pos, e.start).every((b) => b === 0));
      pos = e.start + e.length;
    }
    assert.ok(expected.subarray(pos).every((b) => b === 0));
    assert.ok(
      extents.some((e) => e.start <= 7 * PAGE && e.start + e.length > 7 * PAGE),
      'fill page is data',
    );
  });

  it("CONTINUE refers to the previous record's block across section boundaries", async () => {
    const bytes = Buffer.concat([
      streamHeader(),
      ramStartSection(2, BLOCKS),
      ramSection('part', 2, [pageRecord('pc.bios', 1, patternPage(5, 1))]),
      ramSection('part', 2, [pageRecord(null, 0, patternPage(5, 0))]), // pc.bios, not pc.ram
      ramSection('end', 2, [zeroRecord('pc.ram', 0)]),
      deviceTail(),
    ]);
    const s = await memorySnapshotFromBuffer(bytes);
    assert.equal(s.pages('pc.bios').isData(0), true);
    assert.equal(s.pages('pc.ram').isData(0), false);
    assert.ok((await blockBytes(s, 'pc.bios')).subarray(0, PAGE).equals(patternPage(5, 0)));
    assert.equal(s.pages('pc.ram').counts().unsent, 7);
    assert.throws(() => s.assertComplete(), UnsupportedError);
  });

  it('returns the exact prefix and START section bytes', async () => {
    const header = streamHeader({ uuid: Buffer.alloc(16, 0x11) });
    const start = ramStartSection(2, BLOCKS);
    const bytes = Buffer.concat([header, start, ramSection('end', 2, [zeroRecord('pc.ram', 0)]), deviceTail()]);
    const s = await memorySnapshotFromBuffer(bytes);
    assert.ok((await s.prefixBytes()).equals(header));
    assert.ok((await s.startSectionBytes()).equals(start));
  });

  it('reads the configuration subsections (capabilities, uuid) and the x-ignore-shared block addresses', async () => {
    const blocks = [
      { name: 'pc.ram', length: 4 * PAGE, address: 0 },
      { name: 'pc.bios', length: PAGE, address: 0xfffc0000 },
    ];
    const bytes = Buffer.concat([
      streamHeader({ capabilities: ['x-ignore-shared'], uuid: Buffer.alloc(16, 0xaa) }),
      ramStartSection(3, blocks, [], true),
      ramSection('end', 3, [pageRecord('pc.bios', 0, patternPage(1, 1))]),
      deviceTail(),
    ]);
    const s = await memorySnapshotFromBuffer(bytes);
    assert.deepEqual(s.capabilities, ['x-ignore-shared']);
    assert.deepEqual(
      s.blocks.map((b) => b.name),
      ['pc.ram', 'pc.bios'],
    );
    assert.equal(s.pages('pc.ram').counts().unsent, 4, 'shared RAM is not in the stream');
    assert.throws(() => s.assertComplete(), /not in the stream/);
  });

  it('accepts a stream that ends with QEMU_VM_EOF and no vmdesc', async () => {
    const s = await memorySnapshotFromBuffer(stream([], { tail: deviceTail({ vmdesc: false }) }));
    assert.equal(s.hasVmdesc, false);
  });

  it('names an unknown block with NotFoundError', async () => {
    const s = await memorySnapshotFromBuffer(sampleStream().bytes);
    assert.throws(() => s.block('vga.vram'), NotFoundError);
  });

  it('keeps allocation bounded when a block claims a huge length', async () => {
    const huge = 2 ** 44; // 16 TiB: valid, but only pages that appear cost memory
    const blocks = [{ name: 'pc.ram', length: huge }];
    const before = process.memoryUsage().arrayBuffers;
    const bytes = Buffer.concat([
      streamHeader(),
      ramStartSection(2, blocks),
      ramSection('end', 2, [zeroRecord('pc.ram', huge / PAGE - 1), pageRecord(null, 12345678, patternPage(2, 2))]),
      deviceTail(),
    ]);
    const s = await memorySnapshotFromBuffer(bytes);
    assert.equal(s.blocks[0]!.pages, huge / PAGE);
    assert.ok(process.memoryUsage().arrayBuffers - before < 64 * 1024 * 1024);
    assert.equal(s.pages('pc.ram').isData(12345678), true);
    assert.deepEqual(await s.block('pc.ram').dataExtents(), [{ start: 12345678 * PAGE, length: PAGE }]);
  });
});

describe('memory stream parser refuses', () => {
  it('XBZRLE, compressed pages, multifd and RDMA records, naming the capability', async () => {
    const cases: [number, RegExp][] = [
      [RamFlag.xbzrle, /"xbzrle"/],
      [RamFlag.compressPage, /"compress"/],
      [RamFlag.multifdFlush, /"multifd"/],
      [RamFlag.hook, /rdma/i],
    ];
    for (const [flag, pattern] of cases) {
      const err = await rejects(stream([ramRecord(flag, 0, 'pc.ram', Buffer.alloc(16))]), UnsupportedError, pattern);
      assert.equal(err.code, 'UnsupportedError');
    }
  });

  it('unknown record flags and records in the wrong place as corrupt', async () => {
    await rejects(stream([ramRecord(RamFlag.full, 0, 'pc.ram')]), CorruptInputError, /unknown RAM record flags/);
    await rejects(stream([ramRecord(RamFlag.memSize, 0, 'pc.ram')]), CorruptInputError, /MEM_SIZE/);
    await rejects(stream([zeroRecord('nosuch', 0)]), CorruptInputError, /did not list/);
    await rejects(stream([zeroRecord('pc.bios', 2)]), CorruptInputError, /outside RAM block/);
    const noPrev = Buffer.concat([
      streamHeader(),
      ramStartSection(2, BLOCKS),
      ramSection('end', 2, [zeroRecord(null, 0)]),
      deviceTail(),
    ]);
    await rejects(noPrev, CorruptInputError, /CONTINUE record without a previous block/);
  });

  it('postcopy (migration commands) and other iterative sections; PARTs of unknown sections are corrupt', async () => {
    const advise = Buffer.from([0x08, 0x00, 0x03, 0x00, 0x10, ...Buffer.alloc(16)]);
    await rejects(
      Buffer.concat([streamHeader(), advise, ramStartSection(2, BLOCKS), deviceTail()]),
      UnsupportedError,
      /postcopy-ram/,
    );
    const blockStart = Buffer.from(ramStartSection(3, BLOCKS));
    blockStart.write('blk', 6, 'latin1'); // idstr "ram" → "blk"
    await rejects(
      Buffer.concat([streamHeader(), blockStart, deviceTail()]),
      UnsupportedError,
      /iterative section "blk"/,
    );
    const otherPart = Buffer.concat([
      streamHeader(),
      ramStartSection(2, BLOCKS),
      ramSection('part', 9, []),
      deviceTail(),
    ]);
    await rejects(otherPart, CorruptInputError, /unknown section id 9/);
  });

  it('unknown configuration subsections and non-4K target pages', async () => {
    const sub = (name: string, body: Buffer): Buffer =>
      Buffer.concat([Buffer.of(0x05, name.length), Buffer.from(name), Buffer.from([0, 0, 0, 1]), body]);
    const withSub = (s: Buffer): Buffer =>
      Buffer.concat([streamHeader(), s, ramStartSection(2, BLOCKS), ramSection('end', 2, []), deviceTail()]);
    await rejects(withSub(sub('configuration/new-thing', Buffer.alloc(4))), UnsupportedError, /new-thing/);
    await rejects(
      withSub(sub('configuration/target-page-bits', Buffer.from([0, 0, 0, 16]))),
      UnsupportedError,
      /4 KiB/,
    );
  });

  it('libvirt images that are unfinished or compressed', async () => {
    const inner = sampleStream().bytes;
    const partial = Buffer.concat([buildLibvirtHeader('<domain/>', true), inner]);
    partial.write('LibvirtQemudPart', 0, 'latin1');
    await rejects(partial, CorruptInputError, /unfinished/);
    const gz = Buffer.concat([buildLibvirtHeader('<domain/>', true), inner]);
    gz.writeUInt32LE(1, 28);
    await rejects(gz, UnsupportedError, /gzip/);
    const longXml = Buffer.concat([buildLibvirtHeader('<domain/>', true), inner]);
    longXml.writeUInt32LE(inner.length * 2, 20);
    await rejects(longXml, CorruptInputError, /XML length/);
  });

  it('garbled fields, each with CorruptInputError and its offset', async () => {
    const base = stream([pageRecord('pc.ram', 1, patternPage(3, 1))]);
    const header = streamHeader();
    const start = ramStartSection(2, BLOCKS);
    const flip = (at: number, value: number): Buffer => {
      const b = Buffer.from(base);
      b[at] = value;
      return b;
    };
    await rejects(flip(0, 0x51 ^ 1), CorruptInputError, /QEVM/);
    await rejects(flip(7, 4), CorruptInputError, /version/);
    await rejects(flip(11, 0xff), CorruptInputError, /machine-type length/);
    // MEM_SIZE total (low byte of the be64 after the 18-byte START header)
    const memSizeAt = header.length + 1 + 4 + 4 + 4 + 4;
    await rejects(flip(memSizeAt + 6, 0x01), CorruptInputError, /MEM_SIZE|block/);
    // first block length: not page aligned
    await rejects(flip(memSizeAt + 8 + 1 + 6 + 7, 0x01), CorruptInputError, /invalid length/);
    // START footer marker and id
    await rejects(flip(header.length + start.length - 5, 0x7f), CorruptInputError, /footer/);
    await rejects(flip(header.length + start.length - 1, 0x03), CorruptInputError, /footer names section 3/);
    // a byte where the next section should start
    await rejects(flip(header.length + start.length, 0x42), CorruptInputError, /expected a section/);
  });

  it('every truncation (except the one that drops only the vmdesc)', async () => {
    const sample = sampleStream();
    const full = sample.bytes;
    // the length that keeps QEMU_VM_EOF and drops 0x06 + be32 + JSON
    const vmdescAt = full.length - (5 + Buffer.from('{"page_size": 4096, "devices": []}').length);
    let checked = 0;
    for (let len = 0; len < full.length; len += len < 600 || len > full.length - 200 ? 1 : 61) {
      const cut = full.subarray(0, len);
      if (len === vmdescAt) {
        const s = await memorySnapshotFromBuffer(cut);
        assert.equal(s.hasVmdesc, false);
        continue;
      }
      await rejects(cut, CorruptInputError);
      checked++;
    }
    assert.ok(checked > 800);
  });
});

describe('libvirt save images', () => {
  it('parse like the stream they wrap, little- or big-endian header', async () => {
    const sample = sampleStream(7);
    const xml = '<domain type="kvm"><name>base</name></domain>';
    for (const bigEndian of [false, true]) {
      const header = buildLibvirtHeader(xml, true);
      if (bigEndian) for (let at = 16; at < 92; at += 4) header.writeUInt32BE(header.readUInt32LE(at), at);
      const s = await memorySnapshotFromBuffer(Buffer.concat([header, sample.bytes]));
      assert.equal(s.libvirt?.xml, xml);
      assert.equal(s.libvirt?.wasRunning, true);
      assert.equal(s.streamOffset, header.length);
      for (const [name, expected] of sample.contents) assert.ok((await blockBytes(s, name)).equals(expected));
      assert.ok((await s.prefixBytes()).subarray(0, 4).equals(Buffer.from('QEVM')));
      assert.ok((await s.tail()).equals(sample.bytes.subarray(sample.tailOffset)));
    }
  });
});
