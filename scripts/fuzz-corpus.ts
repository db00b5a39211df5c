/**
 * Writes the crafted cases of the kept fuzz corpus (test/fuzz-corpus/<target>/): every hostile
 * input found by the trust-and-resilience probe, one file each, named after what it lies about.
 * The corpus test (test/unit/fuzz-corpus.test.ts) replays them, with the minimized crashes
 * scripts/fuzz.ts saved (crash-*.bin), on every run. Run again after adding a case:
 *   npm run build && node dist/scripts/fuzz-corpus.js
 */
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, rm, symlink, writeFile, link, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { craftOverlay, headerOf } from '../test/helpers/craft.js';
import { repoRoot } from '../test/helpers/demo-vm.js';
import { deviceTail, ramSection, ramStartSection, streamHeader, zeroRecord } from '../test/helpers/synthetic-stream.js';
import { buildLibvirtHeader } from '../src/image/memory/libvirt.js';
import { encodeHeader } from '../src/image/disk/qcow2-header.js';

const root = join(repoRoot(), 'test', 'fuzz-corpus');
const H = '0'.repeat(64);

async function put(target: string, name: string, data: Buffer): Promise<void> {
  await mkdir(join(root, target), { recursive: true });
  await writeFile(join(root, target, name), data);
  process.stdout.write(`${target}/${name} (${data.length} bytes)\n`);
}

const disk = { name: 'disk', kind: 'disk', size: 4 << 20, digest: H };
const ram = { name: 'pc.ram', kind: 'ram', size: 2 << 20, digest: H };

// Overlays.
await put(
  'overlay',
  'zeros-20mib-segment.overlay',
  craftOverlay({ header: headerOf(H, [disk], [disk]), segments: [{ raw: Buffer.alloc(20 << 20), records: 1 }] }),
);
await put(
  'overlay',
  'ram-block-2pow50.overlay',
  craftOverlay({ header: headerOf(H, [{ ...ram, size: 2 ** 50 }], [{ ...ram, size: 2 ** 50 }]), segments: [] }),
);
await put(
  'overlay',
  'ram-block-larger-than-base.overlay',
  craftOverlay({ header: headerOf(H, [ram], [{ ...ram, size: 2 ** 40 }]), segments: [] }),
);
await put(
  'overlay',
  'targets-1100.overlay',
  craftOverlay({
    header: headerOf(
      H,
      [disk],
      Array.from({ length: 1100 }, (_, i) => ({ name: `t${i}`, kind: 'disk', size: 4096 })),
    ),
    segments: [],
  }),
);
await put(
  'overlay',
  'disk-2pow60.overlay',
  craftOverlay({ header: headerOf(H, [disk], [{ ...disk, size: 2 ** 60 }]), segments: [] }),
);
await put(
  'overlay',
  'ansi-escapes-in-strings.overlay',
  craftOverlay({
    header: headerOf(H, [disk], [disk], {
      creator: '\u001b[31mEVIL\u001b[0m\u009b6n\u0007',
      createdAt: '\u001b]0;x\u0007',
    }),
    segments: [],
  }),
);
await put(
  'overlay',
  'two-signature-values.overlay',
  craftOverlay({
    header: headerOf(H, [disk], [disk], {
      signature: { alg: 'ed25519', key_id: 'a'.repeat(64), sig: 'b'.repeat(128) },
      memory: { machine: 'pc-q35-7.2', mainBlock: 'pc.ram', ramSectionId: 2, sig: 'c'.repeat(128) },
    }),
    segments: [],
  }),
);
await put(
  'overlay',
  'signed-without-index-hash.overlay',
  craftOverlay({
    header: headerOf(H, [disk], [disk], {
      signature: { alg: 'ed25519', key_id: 'a'.repeat(64), sig: 'b'.repeat(128) },
    }),
    segments: [],
    noIndexHash: true,
  }),
);
{
  const b = craftOverlay({
    header: headerOf(H, [disk], [disk]),
    segments: [{ raw: Buffer.from([0, 0, 0, 1]), records: 1 }],
  });
  const wrong = Buffer.from(b);
  wrong.writeUInt16LE(2, 8);
  await put('overlay', 'major-version-2.overlay', wrong);
  const big = Buffer.from(b);
  big.writeUInt32LE(0xffffffff, 12);
  await put('overlay', 'header-length-4g.overlay', big);
  await put('overlay', 'truncated-half.overlay', b.subarray(0, b.length >> 1));
  const idx = Buffer.from(b);
  idx.writeUInt8(idx.readUInt8(idx.length - 74) ^ 1, idx.length - 74); // inside the index frame: index_sha256
  await put('overlay', 'index-byte-flipped.overlay', idx);
}

// Migration streams.
const id = 2;
await put(
  'migration-stream',
  'block-length-2pow50.mem',
  Buffer.concat([
    streamHeader(),
    ramStartSection(id, [{ name: 'pc.ram', length: 2 ** 50 }]),
    ramSection('end', id, [zeroRecord('pc.ram', 0)]),
    deviceTail(),
  ]),
);
await put(
  'migration-stream',
  'page-beyond-block.mem',
  Buffer.concat([
    streamHeader(),
    ramStartSection(id, [{ name: 'pc.ram', length: 1 << 20 }]),
    ramSection('end', id, [zeroRecord('pc.ram', 1 << 30)]),
    deviceTail(),
  ]),
);
await put('migration-stream', 'header-only.mem', streamHeader());

// libvirt save headers.
{
  const h = buildLibvirtHeader('<domain/>', false);
  const huge = Buffer.from(h);
  huge.writeUInt32LE(0x7fffffff, 20); // xml length
  await put('libvirt-header', 'xml-length-2g.img', huge);
  const partial = Buffer.from(h);
  partial.write('LibvirtQemudPart', 0, 'latin1');
  await put('libvirt-header', 'unfinished-save.img', partial);
  await put('libvirt-header', 'truncated.img', h.subarray(0, 40));
}

// Base packages (tar): members that are not regular files or directories, names that escape.
{
  const work = await mkdtemp(join(tmpdir(), 'clo-corpus-'));
  const pid = 'd'.repeat(64);
  const make = async (name: string, build: (dir: string) => Promise<void>, tarArgs: string[] = []): Promise<void> => {
    const d = join(work, name);
    await mkdir(join(d, pid), { recursive: true });
    await build(join(d, pid));
    execFileSync('tar', ['-cf', join(work, `${name}.tar`), ...tarArgs, '-C', d, pid]);
    await put('package-tar', `${name}.tar`, await readFile(join(work, `${name}.tar`)));
  };
  await make('fifo-member', async (d) => void execFileSync('mkfifo', [join(d, 'manifest.json')]));
  await make('symlink-member', (d) => symlink('/etc/shadow', join(d, 'manifest.json')));
  await make('hardlink-member', async (d) => {
    await writeFile(join(d, 'a'), 'x');
    await link(join(d, 'a'), join(d, 'manifest.json'));
  });
  await make('dotdot-name', (d) => writeFile(join(d, 'manifest.json'), '{}'), [
    '--transform',
    `s,^${pid}/manifest.json,${pid}/../../etc/cron.d/x,`,
  ]);
  await make('absolute-name', (d) => writeFile(join(d, 'manifest.json'), '{}'), ['--transform', 's,^,/,', '-P']);
  await make('pax-header', (d) => writeFile(join(d, 'manifest.json'), '{}'), ['--format=pax']);
  // By hand: a character device, a sparse member claiming 2^60 bytes, a bad checksum.
  const header = (name: string, type: string, size: number): Buffer => {
    const h = Buffer.alloc(512);
    h.write(name, 0, 'latin1');
    h.write('0000644\0', 100, 'latin1');
    h.write('0000000\0', 108, 'latin1');
    h.write('0000000\0', 116, 'latin1');
    h.write(size.toString(8).padStart(11, '0') + '\0', 124, 'latin1');
    h.write('00000000000\0', 136, 'latin1');
    h.write(type, 156, 'latin1');
    h.write('ustar  \0', 257, 'latin1');
    h.fill(0x20, 148, 156);
    let sum = 0;
    for (const b of h) sum += b;
    h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
    return h;
  };
  const end = Buffer.alloc(1024);
  await put('package-tar', 'char-device.tar', Buffer.concat([header(`${pid}/manifest.json`, '3', 0), end]));
  const sparse = header(`${pid}/ram/pc.ram.raw`, 'S', 0);
  sparse.write('0000000000\0', 386, 'latin1');
  sparse.write('0000000000\0', 398, 'latin1');
  // The real size in GNU base-256 (high bit set): 2^60 bytes.
  sparse.fill(0, 483, 495);
  sparse.writeUInt8(0x80, 483);
  sparse.writeUInt32BE(2 ** 28, 487); // bytes 487..490: 2^28 · 2^32 = 2^60
  sparse.writeUInt32BE(0, 491);
  sparse.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of sparse) sum += b;
  sparse.write(sum.toString(8).padStart(6, '0') + '\0 ', 148, 'latin1');
  await put('package-tar', 'sparse-2pow60.tar', Buffer.concat([sparse, end]));
  const badsum = header(`${pid}/manifest.json`, '0', 0);
  badsum.writeUInt8(badsum.readUInt8(0) ^ 1, 0);
  await put('package-tar', 'bad-checksum.tar', Buffer.concat([badsum, end]));
  await put('package-tar', 'no-end-marker.tar', header(`${pid}/manifest.json`, '0', 0));
  await put(
    'package-tar',
    'duplicate-member.tar',
    Buffer.concat([header(`${pid}/manifest.json`, '0', 0), header(`${pid}/manifest.json`, '0', 0), end]),
  );
  await rm(work, { recursive: true, force: true });
}

// qcow2 headers.
{
  const good = encodeHeader({
    clusterBits: 12,
    virtualSize: 1 << 30,
    l1Size: 64,
    l1TableOffset: 3 << 12,
    refcountTableOffset: 1 << 12,
    refcountTableClusters: 1,
  });
  const cluster = Buffer.alloc(1 << 12);
  good.copy(cluster);
  const bits = Buffer.from(cluster);
  bits.writeUInt32BE(30, 20);
  await put('qcow2-header', 'cluster-bits-30.qcow2', bits);
  const hl = Buffer.from(cluster);
  hl.writeUInt32BE(0xfffffff8, 100);
  await put('qcow2-header', 'header-length-4g.qcow2', hl);
  const backing = Buffer.from(cluster);
  backing.writeUInt32BE(0, 8);
  backing.writeUInt32BE(0xff0, 12);
  backing.writeUInt32BE(0xffff, 16);
  await put('qcow2-header', 'backing-name-out-of-range.qcow2', backing);
  const u64 = Buffer.from(cluster);
  u64.writeUInt32BE(0xffffffff, 24);
  await put('qcow2-header', 'virtual-size-2pow64.qcow2', u64);
}

// Overlays behind the checksums (the overlay-resealed target: header JSON + raw records, sealed
// by the harness): lies the checksums cannot catch.
{
  const composite = (json: object, segments: Array<{ raw: Buffer; records: number }>): Buffer => {
    const u32 = (n: number): Buffer => {
      const b = Buffer.alloc(4);
      b.writeUInt32LE(n);
      return b;
    };
    const j = Buffer.from(JSON.stringify(json));
    return Buffer.concat([
      u32(j.length),
      j,
      u32(segments.length),
      ...segments.flatMap((s) => [u32(s.raw.length), u32(s.records), s.raw]),
    ]);
  };
  await put(
    'overlay-resealed',
    'ram-2pow50-with-records.bin',
    composite(headerOf(H, [{ ...ram, size: 2 ** 50 }], [{ ...ram, size: 2 ** 50 }], { index_sha256: H }), [
      { raw: Buffer.from([0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x80, 0x80, 0x80, 0x80, 0x01]), records: 1 },
    ]),
  );
  await put(
    'overlay-resealed',
    'record-count-lie.bin',
    composite(headerOf(H, [disk], [disk], { index_sha256: H }), [{ raw: Buffer.from([0, 0, 0, 1]), records: 1000 }]),
  );
  await put(
    'overlay-resealed',
    'self-ref-forward.bin',
    composite(headerOf(H, [disk], [disk, { ...disk, name: 'disk2' }], { index_sha256: H }), [
      { raw: Buffer.from([2, 0, 0, 1, 5, 1]), records: 1 },
    ]),
  );
}
