/**
 * Base locks: an operation that uses a library base (create, apply, synthesize, launch, export,
 * verify) holds a lock on it for as long as it has it open, so `base rm` cannot pull the base
 * away mid-way (a half-written qcow2 whose backing file is gone). A lock is one file per holder
 *
 *   <root>/locks/<id>.<pid>.<start>-<random>.lock   {"id", "pid", "pid_start", "command", "since"}
 *
 * named after its owner (util/owner.ts): a lock of a process that is gone (kill -9, power loss)
 * is stale, ignored, and removed by whoever reads it. No flock: a lock is seen by anyone who
 * lists the directory, and `base rm` moves the base away first and looks for holders after, so a
 * holder that appeared in between is seen (and the base put back).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { onCleanup } from '../util/cleanup.js';
import { ownerIsDead, ownerOf, ownerTag } from '../util/owner.js';

export function locksDir(root: string): string {
  return join(root, 'locks');
}

export interface LockHolder {
  pid: number;
  command: string;
  since: string;
  path: string;
}

/** Takes a lock on base `id`; the returned function releases it (also run by the cleanup registry). */
export async function lockBase(root: string, id: string): Promise<() => Promise<void>> {
  const dir = locksDir(root);
  await mkdir(dir, { recursive: true });
  const path = join(dir, `${id}.${ownerTag()}-${randomBytes(4).toString('hex')}.lock`);
  const [pid, start] = ownerTag().split('.');
  const body = {
    id,
    pid: Number(pid),
    pid_start: start,
    command: process.argv.slice(2, 4).join(' ').slice(0, 100),
    since: new Date().toISOString(),
  };
  try {
    await writeFile(path, JSON.stringify(body) + '\n');
  } catch (err) {
    await rm(path, { force: true }); // a full disk: no half-written lock either
    throw err;
  }
  let released = false;
  const release = async (): Promise<void> => {
    if (released) return;
    released = true;
    unregister();
    await rm(path, { force: true });
  };
  const unregister = onCleanup(release);
  return release;
}

/**
 * The live holders of locks on base `id` (other than `except`, this process's own lock paths);
 * stale locks found on the way are removed.
 */
export async function lockHolders(root: string, id: string): Promise<LockHolder[]> {
  const dir = locksDir(root);
  const out: LockHolder[] = [];
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!name.startsWith(`${id}.`) || !name.endsWith('.lock')) continue;
    const tagged = name.slice(0, -'.lock'.length);
    const path = join(dir, name);
    if (await ownerIsDead(tagged)) {
      await rm(path, { force: true });
      continue;
    }
    const o = ownerOf(tagged);
    type Body = { command?: string; since?: string };
    const empty: Body = {};
    const body = await readFile(path, 'utf8')
      .then((t) => JSON.parse(t) as Body)
      .catch(() => empty);
    out.push({ pid: o?.pid ?? -1, command: body.command ?? '?', since: body.since ?? '?', path });
  }
  return out;
}

/** Removes every stale lock (of processes that are gone; only lists them with dryRun); returns their paths. */
export async function sweepLocks(root: string, dryRun = false): Promise<string[]> {
  const dir = locksDir(root);
  const removed: string[] = [];
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!name.endsWith('.lock') || !(await ownerIsDead(name.slice(0, -'.lock'.length)))) continue;
    if (!dryRun) await rm(join(dir, name), { force: true });
    removed.push(join(dir, name));
  }
  return removed;
}
