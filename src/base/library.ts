/** The base library's operations: list, show, remove, verify, export and import packages. */
import { spawn } from 'node:child_process';
import { mkdir, mkdtemp, open, readdir, rename, rm, stat } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { ChunkMap } from '../delta/chunk-map.js';
import { sha256Hex } from '../delta/hash.js';
import { baseIdOf, type TargetInfo } from '../delta/target.js';
import { syncDir, tempNameFor } from '../util/atomic.js';
import { CorruptInputError, NotFoundError } from '../util/errors.js';
import { findTool, missingTool } from '../util/programs.js';
import { onCleanup } from '../util/cleanup.js';
import { silent, type Progress } from '../util/progress.js';
import { readManifest, type BaseManifest } from './manifest.js';
import { openLibraryBase } from './open.js';
import { baseDir, basesDir, tmpDir } from './paths.js';

export interface BaseSummary {
  id: string;
  name?: string;
  created_at: string;
  machine?: string;
  memory_bytes?: number;
  disk_bytes?: number;
  /** Bytes the base's files occupy on disk. */
  stored_bytes: number;
}

export async function listBases(root: string): Promise<BaseSummary[]> {
  let ids: string[];
  try {
    ids = await readdir(basesDir(root));
  } catch {
    return [];
  }
  const out: BaseSummary[] = [];
  for (const id of ids.filter((n) => /^[0-9a-f]{64}$/.test(n)).sort()) {
    const m = await readManifest(join(baseDir(root, id), 'manifest.json')).catch(() => undefined);
    if (m) out.push(summarize(m, await duBytes(baseDir(root, id))));
  }
  return out;
}

export function summarize(m: BaseManifest, stored: number): BaseSummary {
  const ram = m.targets.filter((t) => t.kind === 'ram').reduce((n, t) => n + t.size, 0);
  return {
    id: m.id,
    name: m.name,
    created_at: m.created_at,
    machine: m.memory?.machine ?? m.vm?.machine,
    memory_bytes: m.memory ? ram : undefined,
    disk_bytes: m.disk?.virtual_size,
    stored_bytes: stored,
  };
}

/** Resolves a unique id prefix (or a base name) to a full id. */
export async function resolveBaseId(root: string, ref: string): Promise<string> {
  const all = await listBases(root);
  const hits = all.filter((b) => b.id.startsWith(ref.toLowerCase()) || b.name === ref);
  if (hits.length === 1) return hits[0]!.id;
  if (hits.length === 0)
    throw new NotFoundError(`no base ${ref} in the library ${root} (see: cloudlet-overlay base list)`, { base: ref });
  throw new NotFoundError(`base ${ref} is ambiguous: ${hits.map((h) => h.id.slice(0, 12)).join(', ')}`, { base: ref });
}

export async function showBase(
  root: string,
  id: string,
): Promise<BaseManifest & { stored_bytes: number; dir: string }> {
  const dir = baseDir(root, id);
  const m = await readManifest(join(dir, 'manifest.json'));
  return { ...m, stored_bytes: await duBytes(dir), dir };
}

/** Removes a base; the caller makes sure no running instance uses it (api/base.ts). */
export async function removeBase(root: string, id: string): Promise<void> {
  const dir = baseDir(root, id);
  await stat(dir).catch(() => {
    throw new NotFoundError(`no base ${id} in the library`, { base: id });
  });
  // Rename first so a half-removed base is never visible under its id.
  await mkdir(tmpDir(root), { recursive: true });
  const doomed = join(tmpDir(root), `rm-${id}-${process.pid}`);
  await rename(dir, doomed);
  await rm(doomed, { recursive: true, force: true });
}

export interface BaseVerifyResult {
  message_type: 'base_verify';
  id: string;
  ok: boolean;
  problems: string[];
}

/** Rehashes every stored file and checks the digests and the id. */
export async function verifyBase(root: string, id: string, progress: Progress = silent): Promise<BaseVerifyResult> {
  const base = await openLibraryBase(root, id);
  const problems: string[] = [];
  try {
    const infos: TargetInfo[] = [];
    for (const [i, t] of base.targets.entries()) {
      const want = base.infos[i]!;
      let digest: string;
      if (t.kind === 'blob') digest = sha256Hex(t.blob);
      else {
        progress.step(`verifying ${t.name}`, t.size);
        const map = await ChunkMap.build(t.source, (n) => progress.advance(n));
        progress.done(`verified ${t.name}`);
        digest = map.digest();
        if (!map.toBuffer().equals(t.map.toBuffer()))
          problems.push(`${t.name}: stored chunk map differs from the data`);
      }
      if (digest !== want.digest) problems.push(`${t.name}: contents changed since import`);
      infos.push({ ...want, digest });
    }
    if (baseIdOf(infos) !== id) problems.push('base id does not match the contents');
  } finally {
    await base.close();
  }
  return { message_type: 'base_verify', id, ok: problems.length === 0, problems };
}

/** Writes the base directory as one tar package (holes kept), atomically. */
export async function exportBase(root: string, id: string, output: string): Promise<{ path: string; size: number }> {
  await showBase(root, id);
  const temp = tempNameFor(output);
  const unregister = onCleanup(() => rm(temp, { force: true }));
  try {
    await tar(['--sparse', '-cf', temp, '-C', basesDir(root), id]);
    const h = await open(temp, 'r+');
    await h.sync();
    await h.close();
    await rename(temp, output);
    await syncDir(dirname(output));
    return { path: output, size: (await stat(output)).size };
  } finally {
    await rm(temp, { force: true });
    unregister();
  }
}

/**
 * The package exportBase writes, as a stream (for an upload; nothing lands on disk): a sparse
 * tar of the base directory that fails, rather than ends short, when tar fails.
 */
export async function exportStream(root: string, id: string): Promise<Readable> {
  await showBase(root, id);
  return tarStream(await findTool('tar'), ['--sparse', '-cf', '-', '-C', basesDir(root), id]);
}

/**
 * `program ARGS` (a tar writing to stdout) as a stream that is destroyed with the error, never
 * ended cleanly, when tar fails: a consumer cannot mistake a short archive for a whole one.
 * Destroying the stream early ends tar.
 */
export function tarStream(program: string, args: string[]): Readable {
  const out = new PassThrough();
  const child = spawn(program, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (c: Buffer) => {
    if (stderr.length < 4096) stderr += c.toString('utf8');
  });
  const exited = new Promise<Error | undefined>((resolve) => {
    child.once('error', (err: NodeJS.ErrnoException) =>
      resolve(err.code === 'ENOENT' ? missingTool('tar', program) : err),
    );
    child.once('close', (code, signal) =>
      resolve(
        code === 0
          ? undefined
          : new CorruptInputError(`tar failed (${signal ?? code}): ${stderr.trim().split('\n').pop()}`),
      ),
    );
  });
  child.stdout.on('data', (c: Buffer) => {
    if (!out.write(c)) child.stdout.pause();
  });
  out.on('drain', () => child.stdout.resume());
  child.stdout.once('end', () => void exited.then((err) => (err ? out.destroy(err) : out.end())));
  void exited.then((err) => err && out.destroy(err));
  out.once('close', () => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
  });
  return out;
}

/** Imports a package made by exportBase, checking every byte against the id before it lands. */
export async function importPackage(
  root: string,
  pkg: string,
  progress: Progress = silent,
): Promise<{ id: string; added: boolean }> {
  await stat(pkg).catch(() => {
    throw new NotFoundError(`package not found: ${pkg}`, { path: pkg });
  });
  await mkdir(tmpDir(root), { recursive: true });
  await mkdir(basesDir(root), { recursive: true });
  const work = await mkdtemp(join(tmpDir(root), 'pkg-'));
  const unregister = onCleanup(() => rm(work, { recursive: true, force: true }));
  try {
    await tar(['-xf', pkg, '-C', work, '--no-same-owner']);
    const entries = await readdir(work);
    if (entries.length !== 1 || !/^[0-9a-f]{64}$/.test(entries[0]!)) {
      throw new CorruptInputError(`${pkg}: not a cloudlet-overlay base package`);
    }
    const id = entries[0]!;
    // Verify in place: a package is untrusted input.
    const fakeRoot = join(work, 'root');
    await mkdir(join(fakeRoot, 'bases'), { recursive: true });
    await rename(join(work, id), join(fakeRoot, 'bases', id));
    const v = await verifyBase(fakeRoot, id, progress);
    if (!v.ok) throw new CorruptInputError(`${pkg}: damaged base package: ${v.problems.join('; ')}`);
    const dest = baseDir(root, id);
    if (await stat(dest).catch(() => undefined)) return { id, added: false };
    await rename(join(fakeRoot, 'bases', id), dest);
    return { id, added: true };
  } finally {
    await rm(work, { recursive: true, force: true });
    unregister();
  }
}

async function tar(args: string[]): Promise<void> {
  const program = await findTool('tar');
  try {
    const { execa } = await import('execa');
    await execa(program, args);
  } catch (err) {
    const e = err as { code?: string; stderr?: string; message: string };
    throw new CorruptInputError(`tar failed: ${(e.stderr ?? e.message).trim().split('\n').pop()}`);
  }
}

/** Allocated bytes of a directory tree (du: holes do not count). */
async function duBytes(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await stat(join(e.parentPath ?? e.path, e.name))).blocks * 512;
  }
  return total;
}
