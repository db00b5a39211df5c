/**
 * The architecture as a test (docs/ARCHITECTURE.md): every folder under src/ has a rule saying
 * which folders it may import; every import obeys its folder's rule; no two folders import each
 * other, even through others (no cycle); nothing imports the CLI. And the error contract: every
 * error class's code is its class name and maps to one exit code, and the exit-code registry is
 * what docs/cli.md and `--help` show.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdir, readFile } from 'node:fs/promises';
import { join, relative, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as errors from '../../src/util/errors.js';
import { EXIT_CODES, ExitCode, exitCodesHelp, exitCodesTable } from '../../src/util/exit-codes.js';
import { buildProgram } from '../../src/cli/main.js';

const SRC = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..', 'src');

interface Rule {
  folder: string;
  /** Folders (or single modules, as folder/module) its files may import besides their own folder. */
  may: readonly string[];
  why: string;
}

/** Top to bottom; a folder may only import folders below it (checked by "the rules are layered"). */
const RULES: readonly Rule[] = [
  { folder: 'cli', may: ['api', 'util'], why: 'the CLI parses options, calls one API function and prints' },
  {
    folder: 'api',
    may: [
      'pipeline',
      'overlay',
      'vm',
      'base',
      'instance',
      'glance',
      'net',
      'nbd',
      'targets',
      'spec',
      'image',
      'delta',
      'util',
    ],
    why: 'the operations compose the layers below',
  },
  {
    folder: 'pipeline',
    may: ['overlay', 'targets', 'image', 'delta', 'util'],
    why: 'the rebuild pipeline: overlay segments decoded on worker threads and assembled into image writers',
  },
  { folder: 'overlay', may: ['delta', 'util'], why: 'the overlay file format carries delta records' },
  { folder: 'vm', may: ['spec', 'util'], why: 'QEMU runs a VmSpec; it knows no base, overlay or library' },
  {
    folder: 'base',
    may: ['targets', 'spec', 'image', 'delta', 'util'],
    why: 'the base library stores VM images as targets',
  },
  { folder: 'instance', may: ['spec', 'util'], why: 'instance state records a VmSpec' },
  {
    folder: 'glance',
    may: ['util'],
    why: 'a Glance client (REST, keystone auth, checked uploads): image data is opaque bytes; what it holds is api/',
  },
  { folder: 'net', may: ['util'], why: 'fetching is plain I/O' },
  {
    folder: 'nbd',
    may: ['delta/source', 'util'],
    why: 'the NBD server serves one export of bytes; it knows no overlay, base or QEMU',
  },
  { folder: 'targets', may: ['image', 'delta', 'util'], why: 'a VM as delta targets: images opened as targets' },
  { folder: 'spec', may: ['util'], why: 'a VmSpec is plain data with checks' },
  {
    folder: 'image',
    may: ['delta/source', 'delta/chunk-store', 'util'],
    why: 'images implement the delta interfaces (ChunkSource, ChunkStore), no more',
  },
  { folder: 'delta', may: ['util/errors', 'util/page'], why: 'the delta library is bytes in, bytes out' },
  { folder: 'util', may: [], why: 'util is the bottom' },
];

interface Import {
  /** Importing file, relative to src/ without extension. */
  file: string;
  /** Imported module, relative to src/ without extension. */
  target: string;
}

async function sourceFiles(): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(SRC, { recursive: true, withFileTypes: true })) {
    if (e.isFile() && e.name.endsWith('.ts')) out.push(join(e.parentPath, e.name));
  }
  return out;
}

async function imports(): Promise<Import[]> {
  const out: Import[] = [];
  for (const path of await sourceFiles()) {
    // Comments may mention imports; only code counts.
    const text = (await readFile(path, 'utf8')).replace(/\/\*[\s\S]*?\*\//g, '').replace(/^\s*\/\/.*$/gm, '');
    for (const m of text.matchAll(/(?:\bfrom|\bimport\(|^\s*import)\s*'(\.[^']+)'/gm)) {
      const spec = m[1] ?? '';
      out.push({
        file: relative(SRC, path).replace(/\.ts$/, ''),
        target: relative(SRC, join(dirname(path), spec)).replace(/\.js$/, ''),
      });
    }
  }
  return out;
}

const folderOf = (module: string): string => module.split('/')[0] ?? module;

function allows(rule: Rule, target: string): boolean {
  if (folderOf(target) === rule.folder) return true;
  return rule.may.some((m) => target === m || target.startsWith(`${m}/`));
}

test('layers: every folder under src/ has a rule', async () => {
  const folders = (await readdir(SRC, { withFileTypes: true })).filter((e) => e.isDirectory()).map((e) => e.name);
  const ruled = RULES.map((r) => r.folder);
  for (const f of folders)
    assert.ok(ruled.includes(f), `src/${f}/ has no row in the layer rules (test/unit/layers.test.ts)`);
  for (const r of ruled) assert.ok(folders.includes(r), `the layer rules name src/${r}/, which does not exist`);
  const loose = (await readdir(SRC, { withFileTypes: true })).filter((e) => e.isFile()).map((e) => e.name);
  assert.deepEqual(loose, [], 'every module sits in a folder');
});

test('layers: the rules are layered (a folder only imports folders below it; nothing imports cli)', () => {
  for (const [i, rule] of RULES.entries()) {
    for (const m of rule.may) {
      const j = RULES.findIndex((r) => r.folder === folderOf(m));
      assert.ok(j > i, `rule "${rule.folder}" may import ${m}, which is not below it`);
    }
  }
});

test('layers: every import obeys its folder rule', async () => {
  const all = await imports();
  assert.ok(all.length > 100, `found the imports (${all.length})`);
  const broken: string[] = [];
  for (const { file, target } of all) {
    const rule = RULES.find((r) => r.folder === folderOf(file));
    if (!rule) {
      broken.push(`${file} is in a folder without a rule`);
      continue;
    }
    if (!allows(rule, target)) {
      broken.push(
        `rule "${rule.folder} may import ${rule.may.join(', ') || 'nothing'}" (${rule.why}): ${file} imports ${target}`,
      );
    }
  }
  assert.deepEqual(broken, []);
});

test('layers: no import cycle between folders', async () => {
  const edges = new Map<string, Set<string>>();
  for (const { file, target } of await imports()) {
    const a = folderOf(file);
    const b = folderOf(target);
    if (a === b) continue;
    if (!edges.has(a)) edges.set(a, new Set());
    edges.get(a)?.add(b);
  }
  // Tarjan's strongly connected components: any with more than one folder is a cycle.
  let counter = 0;
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const cycles: string[][] = [];
  const visit = (v: string): void => {
    index.set(v, counter);
    low.set(v, counter++);
    stack.push(v);
    for (const w of edges.get(v) ?? []) {
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v) ?? 0, low.get(w) ?? 0));
      } else if (stack.includes(w)) {
        low.set(v, Math.min(low.get(v) ?? 0, index.get(w) ?? 0));
      }
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      for (;;) {
        const w = stack.pop();
        if (w === undefined) break;
        component.push(w);
        if (w === v) break;
      }
      if (component.length > 1) cycles.push(component.sort());
    }
  };
  for (const v of edges.keys()) if (!index.has(v)) visit(v);
  assert.deepEqual(cycles, [], `folders that import each other: ${cycles.map((c) => c.join(' ↔ ')).join('; ')}`);
});

test('errors: code equals the class name, exit codes distinct and in the registry', () => {
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
  assert.equal(new Set(EXIT_CODES.map((e) => e.code)).size, EXIT_CODES.length, 'exit codes are distinct');
});

test('exit codes: docs/cli.md and --help show the registry', async () => {
  const doc = await readFile(join(SRC, '..', 'docs', 'cli.md'), 'utf8');
  for (const [name, code] of Object.entries(ExitCode)) {
    assert.match(doc, new RegExp(`\\| ${code} \\| ${name} \\|`), `docs/cli.md lists ${name}`);
  }
  assert.ok(doc.includes(exitCodesTable()), 'the exit-code table of docs/cli.md is exitCodesTable(), row for row');
  let help = '';
  const program = buildProgram().configureOutput({ writeOut: (s) => (help += s), writeErr: (s) => (help += s) });
  program.outputHelp();
  assert.ok(help.includes(exitCodesHelp()), `--help ends with the exit codes:\n${help}`);
  for (const e of EXIT_CODES) assert.ok(help.includes(`${e.code} ${e.label}`), `--help names exit code ${e.code}`);
});
