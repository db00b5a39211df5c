/**
 * The architecture as a test: the chunked-delta library imports nothing from the CLI, QEMU,
 * network, image or overlay code (bytes in, bytes out); nothing imports the CLI; every error
 * class's code is its class name and maps to one exit code.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join, relative, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as errors from '../../src/util/errors.js';
import { ExitCode } from '../../src/util/exit-codes.js';

const SRC = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'src');

async function imports(): Promise<Array<{ file: string; target: string }>> {
  const out: Array<{ file: string; target: string }> = [];
  for (const e of await readdir(SRC, { recursive: true, withFileTypes: true })) {
    if (!e.isFile() || !e.name.endsWith('.ts')) continue;
    const path = join(e.parentPath ?? e.path, e.name);
    const text = await readFile(path, 'utf8');
    for (const m of text.matchAll(/(?:from|import\()\s*'(\.[^']+)'/g)) {
      out.push({ file: relative(SRC, path), target: relative(SRC, join(dirname(path), m[1]!)) });
    }
  }
  return out;
}

const ALLOWED: Array<[string, string[]]> = [
  ['delta/', ['delta/', 'util/errors']],
  ['overlay/', ['delta/', 'overlay/', 'util/']],
  ['image/', ['image/', 'delta/source', 'util/']],
  ['util/', ['util/']],
  // The Glance store sits beside the library and the fetcher, under the API (which uses it).
  ['glance/', ['glance/', 'base/', 'net/', 'overlay/', 'util/', 'api/version']],
];

test('layers: delta is pure, overlay/image sit on it, nothing imports the CLI', async () => {
  const all = await imports();
  assert.ok(all.length > 50, 'found the imports');
  for (const { file, target } of all) {
    for (const [layer, allowed] of ALLOWED) {
      if (file.startsWith(layer)) {
        assert.ok(allowed.some((a) => target.startsWith(a)), `${file} imports ${target}`);
      }
    }
    if (!file.startsWith('cli/')) assert.ok(!target.startsWith('cli/'), `${file} imports the CLI (${target})`);
  }
});

test('errors: code equals the class name, exit codes distinct and documented', async () => {
  const classes = Object.values(errors).filter(
    (v): v is typeof errors.CloudletError => typeof v === 'function' && v.prototype instanceof errors.CloudletError,
  );
  assert.ok(classes.length >= 10);
  const codes = new Map<number, string>();
  for (const C of classes) {
    const e = new C('x');
    assert.equal(e.code, C.name);
    assert.equal(e.name, C.name);
    assert.ok(Object.values(ExitCode).includes(e.exitCode as never), `${C.name} exit code`);
    const prev = codes.get(e.exitCode);
    assert.ok(!prev, `${C.name} and ${prev} share exit code ${e.exitCode}`);
    codes.set(e.exitCode, C.name);
    assert.equal((e.toJSON() as { exit_code: number }).exit_code, e.exitCode);
  }
  const doc = await readFile(join(SRC, '..', 'docs', 'cli.md'), 'utf8');
  for (const [name, code] of Object.entries(ExitCode)) assert.match(doc, new RegExp(`\\| ${code} \\| ${name} \\|`), `docs/cli.md lists ${name}`);
});
