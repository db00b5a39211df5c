/**
 * The parsers that read untrusted bytes, as fuzz targets (the kept corpus test and
 * scripts/fuzz.ts use them): overlay (random-access reader, streaming reader, records), memory
 * migration stream (with every read a consumer does), libvirt save header, base package tar
 * listing, qcow2 header. Each `run` either accepts its input or throws a CloudletError; anything
 * else (another exception, a hang, a huge allocation) is a bug. `seeds` are valid inputs the
 * mutations start from.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BufferSource } from '../../src/delta/buffer-source.js';
import { ChunkMap } from '../../src/delta/chunk-map.js';
import { indexBase } from '../../src/delta/base-index.js';
import { diff } from '../../src/delta/diff.js';
import { initXdelta3 } from '../../src/delta/xdelta3.js';
import { readRecord } from '../../src/delta/record.js';
import { ByteReader } from '../../src/delta/varint.js';
import { baseIdOf, type BaseTarget } from '../../src/delta/target.js';
import { OverlayWriter } from '../../src/overlay/writer.js';
import { OverlayReader } from '../../src/overlay/reader.js';
import { OverlayStreamReader } from '../../src/overlay/stream-reader.js';
import { memorySnapshotFromBuffer } from '../../src/image/memory/index.js';
import { buildLibvirtHeader, readLibvirtHeader } from '../../src/image/memory/libvirt.js';
import { BufferSnapshotBytes } from '../../src/image/memory/snapshot-bytes.js';
import { bufferReader, listPackage } from '../../src/base/package-tar.js';
import { decodeHeader, encodeHeader } from '../../src/image/disk/qcow2-header.js';
import { decompress } from '../../src/delta/zstd.js';
import { signingKeyFrom, trustedKeyFrom } from '../../src/util/sign.js';
import { generateKeyPairSync } from 'node:crypto';
import { sampleStream } from './synthetic-stream.js';
import { craftOverlay } from './craft.js';
import { RecordChecker } from '../../src/delta/check.js';
import { CorruptInputError } from '../../src/util/errors.js';
import { rng, textish } from './rng.js';
import { xorByte } from './bytes.js';

export interface FuzzTarget {
  name: string;
  /** Valid inputs to mutate. */
  seeds(): Promise<Buffer[]>;
  /** Accepts the input or throws a CloudletError. */
  run(input: Buffer): Promise<void>;
  /** Where the structure is (mutations aim there most of the time). */
  hotBytes: number;
  close?(): Promise<void>;
}

const { privateKey, publicKey } = generateKeyPairSync('ed25519');
const signer = signingKeyFrom(privateKey.export({ format: 'pem', type: 'pkcs8' }).toString(), 'fuzz');
const trusted = [trustedKeyFrom(publicKey.export({ format: 'pem', type: 'spki' }).toString(), 'fuzz')];

async function* once(b: Buffer): AsyncGenerator<Uint8Array> {
  // Cut into uneven pieces: the streaming reader must not depend on how bytes arrive.
  for (let at = 0; at < b.length;) {
    const n = 1 + ((at * 7919) % 65536);
    yield b.subarray(at, at + n);
    at += n;
  }
}

/** The overlay readers: random access (header, footer, index, segments, records) and streaming. */
export function overlayTarget(): FuzzTarget {
  let dir: string | undefined;
  let n = 0;
  const file = async (): Promise<string> => {
    dir ??= await mkdtemp(join(tmpdir(), 'clo-fuzz-ov-'));
    return join(dir, `in-${n++ % 4}.overlay`);
  };
  return {
    name: 'overlay',
    hotBytes: 1200,
    async seeds() {
      await initXdelta3();
      const rand = rng(1);
      const baseDisk = textish(rand, 32 * 4096);
      const newDisk = Buffer.from(baseDisk);
      for (let i = 0; i < 20; i++) xorByte(newDisk, Math.floor(rand() * newDisk.length), 1);
      textish(rand, 4 * 4096).copy(newDisk, 20 * 4096);
      newDisk.copy(newDisk, 26 * 4096, 20 * 4096, 22 * 4096);
      const src = new BufferSource('disk', baseDisk);
      const map = await ChunkMap.build(src);
      const base: BaseTarget[] = [
        { name: 'tail', kind: 'blob', size: 9, blob: Buffer.from('base tail') },
        { name: 'disk', kind: 'disk', size: baseDisk.length, source: src, map },
      ];
      const infos = [
        { name: 'tail', kind: 'blob' as const, size: 9, digest: '0'.repeat(64) },
        { name: 'disk', kind: 'disk' as const, size: baseDisk.length, digest: map.digest() },
      ];
      const out: Buffer[] = [];
      for (const sign of [undefined, signer]) {
        const path = await file();
        const w = await OverlayWriter.create(
          path,
          {
            format: 'cloudlet-overlay',
            version: [1, 1],
            createdAt: 'seed',
            creator: 'fuzz',
            chunkSize: 4096,
            base: { id: baseIdOf(infos), targets: infos },
            targets: [
              { name: 'tail', kind: 'blob', size: 12, digest: '' },
              { name: 'disk', kind: 'disk', size: newDisk.length, digest: '' },
            ],
            compression: { codec: 'zstd', level: 3 },
          },
          { sign, force: true },
        );
        const res = await diff(
          base,
          indexBase(base),
          [
            { name: 'tail', kind: 'blob', blob: Buffer.from('custom tail!') },
            { name: 'disk', kind: 'disk', source: new BufferSource('disk', newDisk) },
          ],
          w,
        );
        await w.finish(res.targets, res.stats);
        out.push(await readFile(path));
      }
      return out;
    },
    async run(input) {
      const path = await file();
      await writeFile(path, input);
      const r = await OverlayReader.open(path, { trust: input.includes('"signature"') ? trusted : [] });
      try {
        for (let s = 0; s < r.index.segments.length; s++) {
          const rd = new ByteReader(await r.get(s), `segment ${s}`);
          while (rd.remaining > 0) readRecord(rd);
        }
      } finally {
        await r.close();
      }
      const st = new OverlayStreamReader(once(input), { trust: [] });
      try {
        await st.open();
        for await (const seg of st.segments()) decompress(seg.frame, seg.rawLength, `segment ${seg.index}`);
      } finally {
        await st.close();
      }
    },
    async close() {
      if (dir) await rm(dir, { recursive: true, force: true });
    },
  };
}

/**
 * The overlay readers behind the checksums: an input is a header JSON and raw segment records
 * (mutated as such), sealed into an overlay with every checksum (and index_sha256) right, so
 * the mutations reach the JSON parsers, the index checks and the record parser and checker.
 */
export function resealedOverlayTarget(): FuzzTarget {
  const plain = overlayTarget();
  const encode = (json: Buffer, segments: Array<{ raw: Buffer; records: number }>): Buffer => {
    const parts: Buffer[] = [];
    const u32 = (n: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(n);
      return b;
    };
    parts.push(u32(json.length), json, u32(segments.length));
    for (const sg of segments) parts.push(u32(sg.raw.length), u32(sg.records), sg.raw);
    return Buffer.concat(parts);
  };
  const decode = (b: Buffer): { json: Buffer; segments: Array<{ raw: Buffer; records: number }> } => {
    const rd = { pos: 0 };
    const u32 = (): number => {
      if (rd.pos + 4 > b.length) throw new CorruptInputError('fuzz input: truncated');
      const v = b.readUInt32LE(rd.pos);
      rd.pos += 4;
      return v;
    };
    const take = (n: number): Buffer => {
      if (n > 64 << 20 || rd.pos + n > b.length) throw new CorruptInputError('fuzz input: truncated');
      const out = b.subarray(rd.pos, rd.pos + n);
      rd.pos += n;
      return out;
    };
    const json = take(u32());
    const n = u32();
    if (n > 64) throw new CorruptInputError('fuzz input: too many segments');
    const segments = [];
    for (let i = 0; i < n; i++) {
      const len = u32();
      const records = u32();
      segments.push({ raw: take(len), records });
    }
    return { json, segments };
  };
  let dir: string | undefined;
  return {
    name: 'overlay-resealed',
    hotBytes: 900,
    async seeds() {
      const out: Buffer[] = [];
      dir ??= await mkdtemp(join(tmpdir(), 'clo-fuzz-rs-'));
      for (const seed of (await plain.seeds()).slice(0, 1)) {
        const path = join(dir, 'seed.overlay');
        await writeFile(path, seed);
        const r = await OverlayReader.open(path);
        const segments = [];
        for (let i = 0; i < r.index.segments.length; i++) {
          segments.push({ raw: Buffer.from(await r.get(i)), records: r.index.segments[i]!.records });
        }
        out.push(encode(r.headerJson, segments));
        await r.close();
      }
      return out;
    },
    async run(input) {
      const { json, segments } = decode(input);
      dir ??= await mkdtemp(join(tmpdir(), 'clo-fuzz-rs-'));
      const path = join(dir, 'in.overlay');
      await writeFile(path, craftOverlay({ header: {}, headerJson: json, segments }));
      const r = await OverlayReader.open(path);
      try {
        const checker = new RecordChecker(r.header.targets, r.header.base.targets);
        for (let s = 0; s < r.index.segments.length; s++) {
          const rd = new ByteReader(await r.get(s), `segment ${s}`);
          while (rd.remaining > 0) checker.check(readRecord(rd));
        }
        checker.missing();
      } finally {
        await r.close();
      }
    },
    async close() {
      await plain.close?.();
      if (dir) await rm(dir, { recursive: true, force: true });
    },
  };
}

/** The migration stream parser, and every read a consumer of a parsed snapshot does. */
export function migrationTarget(): FuzzTarget {
  return {
    name: 'migration-stream',
    hotBytes: 600,
    seeds: () => Promise.resolve([sampleStream(11).bytes]),
    async run(input) {
      const s = await memorySnapshotFromBuffer(input, input.length % 3 === 0 ? { chunkSize: 1031 } : {});
      for (const b of s.blocks) {
        const src = s.block(b.name);
        const buf = Buffer.alloc(Math.min(src.size, 1 << 20));
        await src.read(0, buf.length, buf);
        await src.dataExtents();
        s.pages(b.name).counts();
      }
      await s.prefixBytes();
      await s.startSectionBytes();
      await s.tail();
    },
  };
}

/** libvirt's `virsh save` header in front of a stream. */
export function libvirtTarget(): FuzzTarget {
  return {
    name: 'libvirt-header',
    hotBytes: 200,
    seeds: () =>
      Promise.resolve([
        Buffer.concat([buildLibvirtHeader('<domain><name>fuzz</name></domain>', true), sampleStream(3).bytes]),
      ]),
    async run(input) {
      await readLibvirtHeader(new BufferSnapshotBytes(input));
    },
  };
}

/** The base package lister (what may be extracted at all). */
export function tarTarget(): FuzzTarget {
  return {
    name: 'package-tar',
    hotBytes: 3000,
    async seeds() {
      const dir = await mkdtemp(join(tmpdir(), 'clo-fuzz-tar-'));
      try {
        const id = 'c'.repeat(64);
        await mkdir(join(dir, id, 'ram'), { recursive: true });
        await writeFile(join(dir, id, 'manifest.json'), '{"format":"cloudlet-overlay-base"}');
        // A sparse file (GNU 'S' member) and a long name (GNU 'L').
        const sparse = Buffer.alloc(64 << 10);
        sparse.write('data', 40 << 10);
        await writeFile(join(dir, id, 'ram', 'pc.ram.raw'), sparse);
        execFileSync('truncate', ['-s', '1M', join(dir, id, 'ram', 'pc.ram.raw')]);
        await writeFile(join(dir, id, 'ram', `${'x'.repeat(120)}.raw`), 'long');
        execFileSync('tar', ['--sparse', '-cf', join(dir, 'p.tar'), '-C', dir, id]);
        return [await readFile(join(dir, 'p.tar'))];
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    },
    async run(input) {
      await listPackage(bufferReader(input), input.length);
    },
  };
}

/** Our qcow2 header decoder (the writer's own files, read back). */
export function qcow2Target(): FuzzTarget {
  return {
    name: 'qcow2-header',
    hotBytes: 512,
    seeds() {
      const h = encodeHeader({
        clusterBits: 16,
        virtualSize: 1 << 30,
        l1Size: 2,
        l1TableOffset: 3 << 16,
        refcountTableOffset: 1 << 16,
        refcountTableClusters: 1,
        backingFile: '/lib/bases/x/disk.raw',
        backingFormat: 'raw',
      });
      const cluster = Buffer.alloc(1 << 16);
      h.copy(cluster);
      return Promise.resolve([cluster]);
    },
    run(input) {
      decodeHeader(input);
      return Promise.resolve();
    },
  };
}

export const FUZZ_TARGETS: ReadonlyArray<() => FuzzTarget> = [
  overlayTarget,
  resealedOverlayTarget,
  migrationTarget,
  libvirtTarget,
  tarTarget,
  qcow2Target,
];

/** One mutation of `input`: bit flips, bytes, truncation, insertion, deletion, big numbers. */
export function mutate(input: Buffer, rand: () => number, hot: number): Buffer {
  const pick = (n: number): number => Math.floor(rand() * n);
  const at = (b: Buffer): number => (rand() < 0.7 ? pick(Math.max(1, Math.min(hot, b.length))) : pick(b.length));
  let b = Buffer.from(input);
  const rounds = 1 + pick(4);
  for (let i = 0; i < rounds && b.length > 0; i++) {
    switch (pick(7)) {
      case 0: {
        const p = at(b);
        b[p] = b[p]! ^ (1 << pick(8));
        break;
      }
      case 1:
        b[at(b)] = pick(256);
        break;
      case 2:
        b = b.subarray(0, at(b));
        break;
      case 3: {
        const p = at(b);
        b = Buffer.concat([b.subarray(0, p), Buffer.from([pick(256), pick(256)].slice(0, 1 + pick(2))), b.subarray(p)]);
        break;
      }
      case 4: {
        const p = at(b);
        b = Buffer.concat([b.subarray(0, p), b.subarray(p + 1 + pick(16))]);
        break;
      }
      case 5: {
        const p = at(b);
        const values = [0, 1, 0x7f, 0xff, 0xfff, 0x1000, 0x7fffffff, 0x80000000, 0xffffffff];
        const v = values[pick(values.length)]!;
        if (p + 4 <= b.length) {
          if (rand() < 0.5) b.writeUInt32LE(v, p);
          else b.writeUInt32BE(v, p);
        }
        break;
      }
      default: {
        // ASCII digits into JSON (lengths, sizes, counts declared by a header)
        const p = at(b);
        const digits = Buffer.from(String(2 ** pick(60)));
        b = Buffer.concat([b.subarray(0, p), digits, b.subarray(p + digits.length)]);
      }
    }
  }
  return b;
}
