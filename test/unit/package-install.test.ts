/**
 * The package as a user gets it: `npm pack` of a copy of this checkout (prepack builds dist/
 * there), then `npm install -g --prefix TMP` of the tarball, then the installed
 * `cloudlet-overlay` runs `--help`, and `create` + `info` of a small overlay (which loads every
 * dependency, the native zstd addon and the xdelta3 wasm module included).
 *
 * Compiling zstd-napi from source takes ~40 s on two cores, so the install is handed the addon
 * this checkout already compiled (npm ci did), through prebuild-install's documented local
 * prebuild directory: the dependency is still installed by npm and its own install script.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { cp, mkdir, mkdtemp, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';

const run = promisify(execFile);
const ROOT = fileURLToPath(new URL('../../../', import.meta.url));
/** What a checkout holds that a clean clone does not. */
const NOT_IN_A_CLONE = new Set(['node_modules', 'dist', '.git', '.demo', '.cache']);

async function zstdPrebuild(dir: string): Promise<void> {
  const addon = join(ROOT, 'node_modules', 'zstd-napi');
  const pkg = JSON.parse(await readFile(join(addon, 'package.json'), 'utf8')) as {
    version: string;
    binary?: { napi_versions?: number[] };
  };
  const napi = Math.max(...(pkg.binary?.napi_versions ?? [8]));
  // prebuild-install's name for it: {name}-v{version}-napi-v{napi}-{platform}-{arch}.tar.gz
  const name = `zstd-napi-v${pkg.version}-napi-v${napi}-${process.platform}-${process.arch}.tar.gz`;
  await run('tar', ['-czf', join(dir, name), '-C', addon, 'build/Release/binding.node']);
}

test('npm pack → npm install -g → the installed cloudlet-overlay runs', { timeout: 300_000 }, async (t) => {
  const work = await mkdtemp(join(tmpdir(), 'clo-pack-'));
  t.after(() => rm(work, { recursive: true, force: true }));

  // A clean clone: the sources without build output; devDependencies as `npm ci` left them.
  const clone = join(work, 'clone');
  await cp(ROOT, clone, {
    recursive: true,
    filter: (src) => !NOT_IN_A_CLONE.has(src.slice(ROOT.length).split('/')[0] ?? ''),
  });
  await symlink(join(ROOT, 'node_modules'), join(clone, 'node_modules'), 'dir');
  const packed = await run('npm', ['pack', '--json', '--pack-destination', work], { cwd: clone, maxBuffer: 16 << 20 });
  const [info] = JSON.parse(packed.stdout) as Array<{ filename: string; files: Array<{ path: string }> }>;
  assert.ok(info, 'npm pack described its tarball');
  const files = info.files.map((f) => f.path);
  assert.ok(files.includes('dist/src/cli/main.js'), 'the tarball holds the built CLI (prepack built it)');
  assert.ok(files.includes('bin/cloudlet-overlay.js'));
  const extra = files.filter((f) => !/^(bin\/|dist\/src\/.*\.js$|package\.json$|README\.md$)/.test(f));
  assert.deepEqual(extra, [], 'only what runs is shipped (no tests, sources, maps or scripts)');

  const prebuilds = join(work, 'prebuilds');
  await mkdir(prebuilds);
  await zstdPrebuild(prebuilds);
  const prefix = join(work, 'prefix');
  const env = { ...process.env, npm_config_zstd_napi_local_prebuilds: prebuilds };
  await run(
    'npm',
    ['install', '-g', '--prefix', prefix, join(work, info.filename), '--prefer-offline', '--no-audit', '--no-fund'],
    { env, maxBuffer: 16 << 20 },
  );

  const bin = join(prefix, 'bin', 'cloudlet-overlay');
  const libEnv = { ...process.env, CLOUDLET_LIBRARY: join(work, 'lib') };
  const help = await run(bin, ['--help'], { env: libEnv });
  assert.match(help.stdout, /Usage: cloudlet-overlay/);
  assert.match(help.stdout, /Exit codes: 0 ok/);

  const list = await run(bin, ['--json', 'base', 'list'], { env: libEnv });
  assert.deepEqual(JSON.parse(list.stdout), { message_type: 'base_list', bases: [] });

  // A real overlay through the installed copy: two small raw disks that differ in a few places.
  const base = Buffer.alloc(256 * 1024, 0x61);
  const custom = Buffer.from(base);
  custom.fill(0x62, 8192, 8192 + 4096);
  custom.write('installed by the packaged CLI', 100_000);
  await writeFile(join(work, 'base.raw'), base);
  await writeFile(join(work, 'custom.raw'), custom);
  const overlay = join(work, 'app.overlay');
  const create = await run(
    bin,
    ['--json', 'create', '--base-disk', join(work, 'base.raw'), '--base-disk-format', 'raw'].concat([
      '--disk',
      join(work, 'custom.raw'),
      '--disk-format',
      'raw',
      '-o',
      overlay,
    ]),
    { env: libEnv },
  );
  assert.equal((JSON.parse(create.stdout) as { message_type: string }).message_type, 'create');
  const shown = JSON.parse((await run(bin, ['--json', 'info', overlay], { env: libEnv })).stdout) as {
    message_type: string;
    targets: Array<{ name: string; changed_chunks?: number }>;
  };
  assert.equal(shown.message_type, 'info');
  assert.deepEqual(
    shown.targets.map((x) => [x.name, x.changed_chunks]),
    [['disk', 2]],
  );
});
