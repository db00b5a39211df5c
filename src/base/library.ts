/** The base library's operations: list, show, remove, verify (packages: package.ts; a package as a stream here). */
import { spawn } from 'node:child_process';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { PassThrough, type Readable } from 'node:stream';
import { ChunkMap } from '../delta/chunk-map.js';
import { sha256Hex } from '../delta/hash.js';
import { baseIdOf, type TargetInfo } from '../delta/target.js';
import { randomBytes } from 'node:crypto';
import { BusyError, CorruptInputError, NotFoundError } from '../util/errors.js';
import { findTool, missingTool } from '../util/programs.js';
import { ownerTag } from '../util/owner.js';
import { lockHolders } from './locks.js';
import { silent, type Progress } from '../util/progress.js';
import { readManifest, type BaseManifest } from './manifest.js';
import { openLibraryBase } from './open.js';
import { changedSpecFiles } from './vm-files.js';
import { specDigest } from '../spec/validate.js';
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
  /** Set when the manifest cannot be read or is not valid: why (the base cannot be used). */
  damaged?: string;
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
    const dir = baseDir(root, id);
    try {
      out.push(summarize(await readManifest(join(dir, 'manifest.json')), await duBytes(dir)));
    } catch (err) {
      // Shown, not hidden: a damaged base is named by its id, and refused with its reason on use.
      const why = err instanceof Error ? err.message : String(err);
      out.push({ id, created_at: '', stored_bytes: await duBytes(dir).catch(() => 0), damaged: why });
    }
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

/**
 * Removes a base, refused (BusyError) while an operation holds a lock on it (locks.ts) or
 * `inUse` names another user (api/base.ts: running instances). The base is moved away first
 * and the holders looked for after: a holder that took its lock in between is seen, and the
 * base is put back. A half-removed base is never visible under its id.
 */
export async function removeBase(
  root: string,
  id: string,
  inUse: () => Promise<string | undefined> = () => Promise.resolve(undefined),
): Promise<void> {
  const dir = baseDir(root, id);
  await stat(dir).catch(() => {
    throw new NotFoundError(`no base ${id} in the library`, { base: id });
  });
  await mkdir(tmpDir(root), { recursive: true });
  const doomed = join(tmpDir(root), `rm-${id.slice(0, 16)}-${ownerTag()}-${randomBytes(3).toString('hex')}`);
  await rename(dir, doomed);
  const holders = await lockHolders(root, id);
  const other = await inUse();
  if (holders.length > 0 || other) {
    await rename(doomed, dir);
    const who = holders.map((h) => `pid ${h.pid} (${h.command}, since ${h.since})`);
    if (other) who.push(other);
    throw new BusyError(`base ${id.slice(0, 12)} is in use by ${who.join(', ')}: wait for it, or stop it first`, {
      base: id,
    });
  }
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
    const m = base.manifest;
    if (m.vm) {
      for (const f of await changedSpecFiles(base.dir, m.vm, m.vm_files ?? {}))
        problems.push(`${f}: contents changed since import`);
    }
    if (baseIdOf(infos, m.vm ? specDigest(m.vm, m.vm_files ?? {}) : undefined) !== id)
      problems.push('base id does not match the contents');
  } finally {
    await base.close();
  }
  return { message_type: 'base_verify', id, ok: problems.length === 0, problems };
}

/**
 * The package `base export` writes (unsigned), as a stream (for an upload; nothing lands on disk): a sparse
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

/** Allocated bytes of a directory tree (du: holes do not count). */
async function duBytes(dir: string): Promise<number> {
  let total = 0;
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (e.isFile()) total += (await stat(join(e.parentPath ?? e.path, e.name))).blocks * 512;
  }
  return total;
}
