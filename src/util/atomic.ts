/**
 * Files that appear atomically: written under a temporary name in the same directory, fsynced,
 * then renamed over the final name. Until commit() nothing at the final path changes; abort()
 * (or process exit through cleanup.ts) removes the temporary file.
 */
import { AsyncLocalStorage } from 'node:async_hooks';
import { open, rename, rm, type FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { onCleanup } from './cleanup.js';

const scratch = new AsyncLocalStorage<true>();

/**
 * Runs `fn` with commits that skip fsync (still temp name + rename): for files whose loss in a
 * crash loses nothing, like a synthesized VM's instance files — a crash ends that VM anyway,
 * and fsyncing hundreds of MiB of memory stream would delay its first answer for nothing.
 */
export function scratchWrites<T>(fn: () => Promise<T>): Promise<T> {
  return scratch.run(true, fn);
}

/** False inside scratchWrites(). */
export function durable(): boolean {
  return scratch.getStore() !== true;
}

export class AtomicFile {
  readonly tempPath: string;
  private done = false;
  private readonly unregister: () => void;

  private constructor(
    readonly path: string,
    readonly handle: FileHandle,
    tempPath: string,
  ) {
    this.tempPath = tempPath;
    this.unregister = onCleanup(() => this.abort());
  }

  static async create(path: string): Promise<AtomicFile> {
    const tempPath = tempNameFor(path);
    const handle = await open(tempPath, 'wx+', 0o644);
    return new AtomicFile(path, handle, tempPath);
  }

  /** fsync, rename into place, fsync the directory so the rename itself is durable. */
  async commit(): Promise<void> {
    if (this.done) return;
    if (durable()) await this.handle.sync();
    await this.handle.close();
    await rename(this.tempPath, this.path);
    this.done = true;
    this.unregister();
    await syncDir(dirname(this.path));
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.unregister();
    await this.handle.close().catch(() => undefined);
    await rm(this.tempPath, { force: true });
  }
}

export function tempNameFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${randomBytes(4).toString('hex')}`);
}

export async function syncDir(dir: string): Promise<void> {
  if (!durable()) return;
  const h = await open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** Writes a whole buffer atomically. */
export async function writeFileAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const f = await AtomicFile.create(path);
  try {
    await f.handle.writeFile(data);
    await f.commit();
  } catch (err) {
    await f.abort();
    throw err;
  }
}
