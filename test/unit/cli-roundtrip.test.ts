/**
 * create → apply through the built CLI on generated VM pairs: disks as raw and qcow2 (with a
 * backing chain), memory as migration streams; outputs compared byte for byte (qemu-img
 * compare for disks, page by page for memory) and checked with qemu-img check.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { safeName } from '../../src/util/safe-name.js';
import { openMemorySnapshot } from '../../src/image/memory/snapshot.js';
import { buildLibvirtHeader } from '../../src/image/memory/libvirt.js';
import { PAGE, qemuImg, qemuIo, rng, streamOf, textish } from '../helpers/synthetic-vm.js';
import { xorByte } from '../helpers/bytes.js';

const run = promisify(execFile);
const BIN = fileURLToPath(new URL('../../../bin/cloudlet-overlay.js', import.meta.url));

interface CliResult {
  code: number;
  json: Record<string, unknown>;
  stderr: string;
}

async function cli(...args: string[]): Promise<CliResult> {
  try {
    const r = await run(process.execPath, [BIN, '--json', ...args], { maxBuffer: 64 << 20 });
    return { code: 0, json: JSON.parse(r.stdout) as Record<string, unknown>, stderr: r.stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    let json: Record<string, unknown> = {};
    try {
      json = JSON.parse(e.stdout) as Record<string, unknown>;
    } catch {
      // no JSON (commander usage errors)
    }
    return { code: e.code, json, stderr: e.stderr };
  }
}

let dir: string;
const mem = { base: new Map<string, Buffer>(), cust: new Map<string, Buffer>() };

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-cli-'));
  const rand = rng(7);
  // Base disk: 8 MiB raw with data in places.
  const disk = Buffer.alloc(8 << 20);
  textish(rand, 3 << 20).copy(disk, 1 << 20);
  textish(rand, 512 << 10).copy(disk, 6 << 20);
  await writeFile(join(dir, 'base.raw'), disk);
  // Base memory: pc.ram with text and zero pages, small ROM-like blocks.
  const ram = Buffer.alloc(4 << 20);
  textish(rand, 2 << 20).copy(ram, 0);
  mem.base.set('pc.ram', ram);
  mem.base.set('pc.bios', textish(rand, 256 << 10));
  mem.base.set('/rom@etc/acpi/tables', Buffer.concat([textish(rand, 8192), Buffer.alloc(120 << 10)]));
  await writeFile(join(dir, 'base.mem'), streamOf([...mem.base], { state: Buffer.from('device-state-base') }));

  // Customized disk: base.raw <- mid.qcow2 <- cust.qcow2, written through qemu-io.
  qemuImg('create', '-q', '-f', 'qcow2', '-b', join(dir, 'base.raw'), '-F', 'raw', join(dir, 'mid.qcow2'));
  qemuIo(join(dir, 'mid.qcow2'), 'qcow2', ['write -P 0x61 0 64k', 'write -z 1M 256k']);
  qemuImg('create', '-q', '-f', 'qcow2', '-b', join(dir, 'mid.qcow2'), '-F', 'qcow2', join(dir, 'cust.qcow2'));
  qemuIo(join(dir, 'cust.qcow2'), 'qcow2', ['write -P 0x62 2M 12k', 'write -P 0x63 7340032 4k', 'write -z 6M 8k']);
  // A "file" written to disk that also sits in the page cache.
  const file = textish(rand, 64 << 10);
  await writeFile(join(dir, 'file.bin'), file);
  qemuImg('dd', '-f', 'raw', '-O', 'raw', `if=${join(dir, 'file.bin')}`, `of=${join(dir, 'file.raw')}`, 'bs=4096');
  // Customized memory: edits, moved pages, data→zero, zero→data, the file's pages.
  const cram = Buffer.from(ram);
  for (let i = 0; i < 300; i++) xorByte(cram, Math.floor(rand() * (2 << 20)), 0x20);
  ram.copy(cram, 3 << 20, 100 * PAGE, 120 * PAGE);
  cram.fill(0, 10 * PAGE, 14 * PAGE);
  cram.fill(0x11, (2 << 20) + PAGE, (2 << 20) + 2 * PAGE);
  file.copy(cram, (2 << 20) + 8 * PAGE);
  mem.cust.set('pc.ram', cram);
  mem.cust.set('pc.bios', mem.base.get('pc.bios')!);
  const acpi = Buffer.from(mem.base.get('/rom@etc/acpi/tables')!);
  acpi.write('customized tables', 100);
  mem.cust.set('/rom@etc/acpi/tables', acpi);
  await writeFile(join(dir, 'cust.mem'), streamOf([...mem.cust], { state: Buffer.from('device-state-cust') }));
  // Write the same file into the disk too (the customized VM saved it).
  qemuIo(join(dir, 'cust.qcow2'), 'qcow2', [`write -s ${join(dir, 'file.bin')} 4M 64k`]);
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function assertMemory(streamPath: string, expected: Map<string, Buffer>): Promise<void> {
  const snap = await openMemorySnapshot(streamPath);
  try {
    for (const [name, data] of expected) {
      const got = Buffer.alloc(data.length);
      await snap.block(name).read(0, data.length, got);
      assert.ok(got.equals(data), `RAM block ${name} differs`);
    }
    assert.ok((await snap.tail()).includes(Buffer.from('device-state-cust')), 'device tail is the customized one');
  } finally {
    await snap.close();
  }
}

test('create + apply: qcow2 chain disk and memory stream come back identical', async () => {
  const c = await cli(
    'create',
    '--base-disk',
    join(dir, 'base.raw'),
    '--base-memory',
    join(dir, 'base.mem'),
    '--disk',
    join(dir, 'cust.qcow2'),
    '--memory',
    join(dir, 'cust.mem'),
    '-o',
    join(dir, 'a.overlay'),
  );
  assert.equal(c.code, 0, c.stderr);
  const stats = c.json.stats as { encodings: Record<string, { chunks: number }> };
  assert.ok((stats.encodings.base_ref?.chunks ?? 0) >= 20, 'moved pages found in the base');
  assert.ok((stats.encodings.self_ref?.chunks ?? 0) >= 16, 'the file in memory refers to the disk copy');
  const size = (await stat(join(dir, 'a.overlay'))).size;
  assert.ok(size < 200_000, `overlay is ${size} bytes`);

  const v = await cli('verify', join(dir, 'a.overlay'));
  assert.equal(v.code, 0, v.stderr);

  const a = await cli(
    'apply',
    join(dir, 'a.overlay'),
    '--base-disk',
    join(dir, 'base.raw'),
    '--base-memory',
    join(dir, 'base.mem'),
    '-o',
    join(dir, 'out1'),
  );
  assert.equal(a.code, 0, a.stderr);
  assert.match(
    qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', join(dir, 'out1', 'disk.qcow2'), join(dir, 'cust.qcow2')),
    /identical/,
  );
  const check = JSON.parse(qemuImg('check', '--output=json', join(dir, 'out1', 'disk.qcow2'))) as Record<
    string,
    unknown
  >;
  assert.equal(check['corruptions'] ?? 0, 0);
  assert.equal(check['leaks'] ?? 0, 0);
  assert.equal(check['check-errors'], 0);
  await assertMemory(join(dir, 'out1', 'memory.stream'), mem.cust);
  assert.deepEqual((await readdir(join(dir, 'out1'))).sort(), ['disk.qcow2', 'manifest.json', 'memory.stream']);
});

test('apply: raw disk, raw memory blocks, and a sparse stream over the base RAM file', async () => {
  const common = ['--base-disk', join(dir, 'base.raw'), '--base-memory', join(dir, 'base.mem')];
  const a = await cli(
    'apply',
    join(dir, 'a.overlay'),
    ...common,
    '-o',
    join(dir, 'out2'),
    '--disk-format',
    'raw',
    '--memory-format',
    'raw',
  );
  assert.equal(a.code, 0, a.stderr);
  assert.match(
    qemuImg('compare', '-f', 'raw', '-F', 'qcow2', join(dir, 'out2', 'disk.raw'), join(dir, 'cust.qcow2')),
    /identical/,
  );
  for (const [name, data] of mem.cust) {
    const file = join(dir, 'out2', 'memory', `${safeName(name)}.raw`);
    assert.ok((await readFile(file)).equals(data), `raw block ${name}`);
  }

  await writeFile(join(dir, 'base-pc.ram'), mem.base.get('pc.ram')!);
  const s = await cli(
    'apply',
    join(dir, 'a.overlay'),
    ...common,
    '-o',
    join(dir, 'out3'),
    '--memory-format',
    'sparse',
    '--base-ram',
    join(dir, 'base-pc.ram'),
  );
  assert.equal(s.code, 0, s.stderr);
  // Resume semantics of a sparse stream: base RAM file, then the stream's pages on top.
  const snap = await openMemorySnapshot(join(dir, 'out3', 'memory.sparse'));
  try {
    const ram = Buffer.from(mem.base.get('pc.ram')!);
    const states = snap.pages('pc.ram');
    const page = Buffer.alloc(PAGE);
    let sent = 0;
    for (let p = 0; p < states.pages; p++) {
      if (!states.isSent(p)) continue;
      sent++;
      await snap.block('pc.ram').read(p * PAGE, PAGE, page);
      page.copy(ram, p * PAGE);
    }
    assert.ok(ram.equals(mem.cust.get('pc.ram')!), 'sparse pc.ram over the base equals the customized RAM');
    let differ = 0;
    const b = mem.base.get('pc.ram')!;
    const c = mem.cust.get('pc.ram')!;
    for (let p = 0; p < states.pages; p++)
      if (!b.subarray(p * PAGE, (p + 1) * PAGE).equals(c.subarray(p * PAGE, (p + 1) * PAGE))) differ++;
    assert.equal(sent, differ, 'the sparse stream sends exactly the pages that differ from the base');
    assert.equal(snap.pages('pc.bios').counts().unsent, 0, 'small blocks are sent whole');
  } finally {
    await snap.close();
  }
});

test('disk-only overlay; sizes not a multiple of 4 KiB; disk grows', async () => {
  const rand = rng(11);
  const base = Buffer.concat([textish(rand, 40 * PAGE), Buffer.alloc(3 * 512)]);
  const cust = Buffer.concat([base.subarray(0, 30 * PAGE), textish(rand, 20 * PAGE + 2560)]);
  await writeFile(join(dir, 'b2.raw'), base);
  await writeFile(join(dir, 'c2.raw'), cust);
  const c = await cli(
    'create',
    '--base-disk',
    join(dir, 'b2.raw'),
    '--disk',
    join(dir, 'c2.raw'),
    '-o',
    join(dir, 'b.overlay'),
  );
  assert.equal(c.code, 0, c.stderr);
  for (const fmt of ['qcow2', 'raw']) {
    const a = await cli(
      'apply',
      join(dir, 'b.overlay'),
      '--base-disk',
      join(dir, 'b2.raw'),
      '-o',
      join(dir, `out-b-${fmt}`),
      '--disk-format',
      fmt,
    );
    assert.equal(a.code, 0, a.stderr);
    assert.match(
      qemuImg('compare', '-f', fmt, '-F', 'raw', join(dir, `out-b-${fmt}`, `disk.${fmt}`), join(dir, 'c2.raw')),
      /identical/,
    );
  }
});

const BAD_INPUT =
  'bad input: wrong base, truncated, bit-flipped, unknown version, missing files — clear errors, nothing written';
test(BAD_INPUT, async () => {
  const good = await readFile(join(dir, 'a.overlay'));
  const common = ['--base-disk', join(dir, 'base.raw'), '--base-memory', join(dir, 'base.mem')];
  const expectFail = async (
    overlay: string,
    code: number,
    pattern: RegExp,
    extra: string[] = common,
  ): Promise<void> => {
    const out = join(dir, `fail-${Math.random().toString(36).slice(2)}`);
    const r = await cli('apply', overlay, ...extra, '-o', out);
    assert.equal(r.code, code, `${overlay}: ${r.stderr}`);
    assert.match(String(r.json.message), pattern);
    assert.equal(r.stderr.trim().split('\n').length, 1, `one line on stderr: ${r.stderr}`);
    const left = await readdir(out).catch(() => []);
    assert.deepEqual(left, [], 'no output left behind');
  };
  await expectFail(join(dir, 'a.overlay'), 5, /made for base/, [
    '--base-disk',
    join(dir, 'cust.qcow2'),
    '--base-memory',
    join(dir, 'cust.mem'),
  ]);
  await writeFile(join(dir, 'trunc.overlay'), good.subarray(0, good.length - 100));
  await expectFail(join(dir, 'trunc.overlay'), 4, /truncated|footer/);
  const flipped = Buffer.from(good);
  xorByte(flipped, Math.floor(good.length / 2), 0x04);
  await writeFile(join(dir, 'flip.overlay'), flipped);
  await expectFail(join(dir, 'flip.overlay'), 4, /checksum|damaged/);
  const v2 = Buffer.from(good);
  v2.writeUInt16LE(2, 8);
  await writeFile(join(dir, 'v2.overlay'), v2);
  await expectFail(join(dir, 'v2.overlay'), 7, /version 2\.\d+ is not supported/);
  await expectFail(join(dir, 'nothere.overlay'), 3, /not found/);
  await expectFail(join(dir, 'a.overlay'), 3, /not found|does not exist|No such file/, [
    '--base-disk',
    join(dir, 'nothere.raw'),
    '--base-memory',
    join(dir, 'base.mem'),
  ]);
});

test('info reports base, targets and encodings', async () => {
  const r = await cli('info', join(dir, 'a.overlay'));
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.json.message_type, 'info');
  const targets = r.json.targets as Array<{ name: string }>;
  assert.deepEqual(
    targets.map((t) => t.name),
    // Memory first: a synthesizing QEMU loads it while the disk still arrives.
    ['stream.prefix', 'stream.start', 'stream.tail', 'pc.ram', 'pc.bios', '/rom@etc/acpi/tables', 'disk'],
  );
  assert.equal((r.json.memory as { machine: string }).machine, 'pc-q35-7.2');
});

test('a libvirt save image works as the base memory and is the same base as the bare stream', async () => {
  const stream = await readFile(join(dir, 'base.mem'));
  const xml = '<domain type="kvm"><name>base</name></domain>';
  await writeFile(join(dir, 'base.save'), Buffer.concat([buildLibvirtHeader(xml, true), stream]));
  const c = await cli(
    'create',
    '--base-disk',
    join(dir, 'base.raw'),
    '--base-memory',
    join(dir, 'base.save'),
    '--disk',
    join(dir, 'cust.qcow2'),
    '--memory',
    join(dir, 'cust.mem'),
    '-o',
    join(dir, 'lv.overlay'),
  );
  assert.equal(c.code, 0, c.stderr);
  const a = await cli('info', join(dir, 'a.overlay'));
  assert.equal(c.json.base_id, a.json.base_id, 'same base id whether wrapped by libvirt or not');
  const ap = await cli(
    'apply',
    join(dir, 'lv.overlay'),
    '--base-disk',
    join(dir, 'base.raw'),
    '--base-memory',
    join(dir, 'base.save'),
    '-o',
    join(dir, 'out-lv'),
  );
  assert.equal(ap.code, 0, ap.stderr);
  await assertMemory(join(dir, 'out-lv', 'memory.stream'), mem.cust);
});
