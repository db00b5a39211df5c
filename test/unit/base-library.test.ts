/**
 * The base library through the CLI, on generated images (no QEMU): import from files, list,
 * show, create/apply against a library base (sparse memory over the base RAM file by default),
 * export as a package, import it elsewhere with verification, refuse a damaged package, remove.
 */
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, readFile, rm, writeFile, stat, mkdir, readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { cli } from '../helpers/cli.js';
import { PAGE, rng, streamOf, textish } from '../helpers/synthetic-vm.js';
import { xorByte } from '../helpers/bytes.js';

let dir: string;
let env: NodeJS.ProcessEnv;
let id = '';

before(async () => {
  dir = await mkdtemp(join(tmpdir(), 'clo-lib-'));
  env = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib') };
  const rand = rng(3);
  const disk = Buffer.alloc(4 << 20);
  textish(rand, 1 << 20).copy(disk, 1 << 20);
  await writeFile(join(dir, 'base.raw'), disk);
  const ram = Buffer.alloc(2 << 20);
  textish(rand, 1 << 20).copy(ram, 0);
  await writeFile(
    join(dir, 'base.mem'),
    streamOf([
      ['pc.ram', ram],
      ['pc.bios', textish(rand, 64 << 10)],
    ]),
  );
  const cram = Buffer.from(ram);
  cram.fill(0x33, 5 * PAGE, 9 * PAGE);
  await writeFile(
    join(dir, 'cust.mem'),
    streamOf([
      ['pc.ram', cram],
      ['pc.bios', textish(rng(3), 64 << 10)],
    ]),
  );
  const cdisk = Buffer.from(disk);
  cdisk.write('customized', 3 << 20);
  await writeFile(join(dir, 'cust.raw'), cdisk);
  await writeFile(
    join(dir, 'vm.json'),
    JSON.stringify({ machine: 'pc-q35-7.2', memoryMiB: 2, drives: [{ file: 'x', format: 'raw', if: 'virtio' }] }),
  );
});

after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test('base import, list, show; create and apply against the library base', async () => {
  const imp = await cli(
    [
      'base',
      'import',
      '--disk',
      join(dir, 'base.raw'),
      '--memory',
      join(dir, 'base.mem'),
      '--vm',
      join(dir, 'vm.json'),
      '--name',
      'tiny',
    ],
    env,
  );
  assert.equal(imp.code, 0, imp.stderr);
  id = String(imp.json.id);
  assert.match(id, /^[0-9a-f]{64}$/);
  const again = await cli(
    [
      'base',
      'import',
      '--disk',
      join(dir, 'base.raw'),
      '--memory',
      join(dir, 'base.mem'),
      '--vm',
      join(dir, 'vm.json'),
    ],
    env,
  );
  assert.equal(again.json.added, false, 'the same base twice is one base');
  const list = await cli(['base', 'list'], env);
  assert.deepEqual(
    (list.json.bases as Array<{ id: string }>).map((b) => b.id),
    [id],
  );
  const show = await cli(['base', 'show', 'tiny'], env);
  assert.equal(show.json.id, id);
  assert.equal((show.json.vm as { drives: Array<{ file: string }> }).drives[0]!.file, 'disk.raw');

  const c = await cli(
    [
      'create',
      '--base',
      id.slice(0, 10),
      '--disk',
      join(dir, 'cust.raw'),
      '--memory',
      join(dir, 'cust.mem'),
      '-o',
      join(dir, 'o.overlay'),
    ],
    env,
  );
  assert.equal(c.code, 0, c.stderr);
  // The same base given as files (with the VM spec it was imported with: the id covers the spec)
  // has the same id: overlays do not care where the base lives.
  const cf = await cli(
    [
      'create',
      '--base-disk',
      join(dir, 'base.raw'),
      '--base-memory',
      join(dir, 'base.mem'),
      '--base-vm',
      join(dir, 'vm.json'),
      '--disk',
      join(dir, 'cust.raw'),
      '--memory',
      join(dir, 'cust.mem'),
      '-o',
      join(dir, 'f.overlay'),
    ],
    env,
  );
  assert.equal(cf.json.base_id, id);

  const a = await cli(['apply', join(dir, 'o.overlay'), '--base', 'tiny', '-o', join(dir, 'out')], env);
  assert.equal(a.code, 0, a.stderr);
  const m = a.json.manifest as { memory: { format: string; base_ram_file: string } };
  assert.equal(m.memory.format, 'sparse', 'sparse by default with a library base');
  assert.ok(m.memory.base_ram_file.startsWith(join(dir, 'lib', 'bases', id)));
  assert.match(
    execFileSync(
      'qemu-img',
      ['compare', '-f', 'qcow2', '-F', 'raw', join(dir, 'out', 'disk.qcow2'), join(dir, 'cust.raw')],
      { encoding: 'utf8' },
    ),
    /identical/,
  );
});

test('export a package, import it into another library (verified), refuse a damaged one, rm', async () => {
  const pkg = join(dir, 'tiny.tar');
  const e = await cli(['base', 'export', 'tiny', '-o', pkg], env);
  assert.equal(e.code, 0, e.stderr);
  const env2 = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib2') };
  const i = await cli(['base', 'import', pkg], env2);
  assert.equal(i.code, 0, i.stderr);
  assert.equal(i.json.id, id);
  assert.equal((await cli(['base', 'verify', id], env2)).code, 0);

  // Damage one byte of a stored RAM file inside the package: the import must refuse it.
  const work = join(dir, 'unpack');
  await mkdir(work);
  execFileSync('tar', ['-xf', pkg, '-C', work]);
  const ramFile = join(work, id, 'ram', 'pc.ram.raw');
  const ram = await readFile(ramFile);
  xorByte(ram, 100, 1);
  await writeFile(ramFile, ram);
  execFileSync('tar', ['-cf', join(dir, 'bad.tar'), '-C', work, id]);
  const env3 = { ...process.env, CLOUDLET_LIBRARY: join(dir, 'lib3') };
  const bad = await cli(['base', 'import', join(dir, 'bad.tar')], env3);
  assert.equal(bad.code, 4, bad.stderr);
  assert.match(bad.stderr, /damaged/);
  assert.deepEqual(await readdir(join(dir, 'lib3', 'bases')).catch(() => []), [], 'nothing imported');

  const r = await cli(['base', 'rm', 'tiny'], env2);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(await stat(join(dir, 'lib2', 'bases', id)).catch(() => 'gone'), 'gone');
  assert.equal((await cli(['base', 'show', id], env2)).code, 3);
});
