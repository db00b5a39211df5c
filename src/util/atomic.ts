/**
 * Files that appear atomically: written under a temporary name in the same directory, fsynced,
 * then moved to the final name. Until commit() nothing at the final path changes; abort()
 * (or process exit through cleanup.ts) removes the temporary file. With `force: false` an
 * existing final file is refused (BusyError) on create and again at commit (link, not rename: a
 * file that appeared meanwhile is never replaced). Temporary names carry their owner (owner.ts):
 * leftovers of a killed run are removed by the next write to the same name (sweepTemps).
 *
 * `durable: false` skips the fsyncs (still temp name + rename): for files whose loss in a crash
 * loses nothing, like a synthesized VM's instance files — a crash ends that VM anyway, and
 * fsyncing hundreds of MiB would delay its first answer for nothing.
 */
import { link, lstat, mkdtemp, open, readdir, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { onCleanup } from './cleanup.js';
import { BusyError, NotFoundError, classifyFsError } from './errors.js';
import { ownerIsDead, ownerTag } from './owner.js';

export interface AtomicOptions {
  /** fsync the file and its directory on commit (default true). */
  durable?: boolean;
  /**
   * Replace an existing file (default true). User-facing outputs pass the user's --force: false
   * refuses an existing file (BusyError) on create and at commit.
   */
  force?: boolean;
}

export class AtomicFile {
  readonly tempPath: string;
  private done = false;
  private readonly unregister: () => void;

  private constructor(
    readonly path: string,
    readonly handle: FileHandle,
    tempPath: string,
    private readonly force: boolean,
    private readonly durable: boolean,
  ) {
    this.tempPath = tempPath;
    this.unregister = onCleanup(() => this.abort());
  }

  /**
   * Opens a temporary file beside `path`. Refuses a missing directory (NotFoundError), a
   * directory at `path`, and with `force: false` an existing file at `path` (BusyError).
   */
  static async create(path: string, opts: AtomicOptions = {}): Promise<AtomicFile> {
    const force = opts.force ?? true;
    await checkOutputPath(path, force);
    await sweepTemps(path);
    const tempPath = tempNameFor(path);
    let handle: FileHandle;
    try {
      handle = await open(tempPath, 'wx+', 0o644);
    } catch (err) {
      throw classifyFsError(err, path);
    }
    return new AtomicFile(path, handle, tempPath, force, opts.durable ?? true);
  }

  /** fsync, move into place, fsync the directory so the move itself is durable. */
  async commit(): Promise<void> {
    if (this.done) return;
    try {
      if (this.durable) await this.handle.sync();
      await this.handle.close();
      if (this.force) {
        await rename(this.tempPath, this.path);
      } else {
        await link(this.tempPath, this.path).catch((err: unknown) => {
          if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
            throw new BusyError(`${this.path} already exists (use --force to replace it)`, { path: this.path });
          }
          throw err;
        });
        await unlink(this.tempPath);
      }
    } catch (err) {
      await this.abort();
      throw classifyFsError(err, this.path);
    }
    this.done = true;
    this.unregister();
    if (this.durable) await syncDir(dirname(this.path));
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.unregister();
    await this.handle.close().catch(() => undefined);
    await rm(this.tempPath, { force: true });
  }
}

/** A temporary name beside `path`, carrying this process as its owner. */
export function tempNameFor(path: string): string {
  return join(dirname(path), `.${basename(path)}.tmp-${ownerTag()}-${randomBytes(4).toString('hex')}`);
}

/**
 * Refuses an output path whose directory is missing (NotFoundError), that is a directory, or
 * (without force) that exists (BusyError).
 */
export async function checkOutputPath(path: string, force: boolean): Promise<void> {
  const dir = dirname(path);
  const d = await stat(dir).catch(() => undefined);
  if (!d) throw new NotFoundError(`the output directory ${dir} does not exist`, { path: dir });
  if (!d.isDirectory()) throw new NotFoundError(`${dir} is not a directory`, { path: dir });
  const st = await lstat(path).catch(() => undefined);
  if (!st) return;
  if (st.isDirectory()) throw new BusyError(`${path} is a directory, not a file`, { path });
  if (!force) throw new BusyError(`${path} already exists (use --force to replace it)`, { path });
}

/** Removes temporary files for `path` left by processes that are gone; returns what was removed. */
export async function sweepTemps(path: string): Promise<string[]> {
  const dir = dirname(path);
  const prefix = `.${basename(path)}.tmp-`;
  const removed: string[] = [];
  for (const name of await readdir(dir).catch(() => [] as string[])) {
    if (!name.startsWith(prefix) || !(await ownerIsDead(name))) continue;
    await rm(join(dir, name), { force: true, recursive: true }).catch(() => undefined);
    removed.push(join(dir, name));
  }
  return removed;
}

export async function syncDir(dir: string): Promise<void> {
  const h = await open(dir, 'r');
  try {
    await h.sync();
  } finally {
    await h.close();
  }
}

/** Writes a whole buffer atomically. */
export async function writeFileAtomic(
  path: string,
  data: string | Uint8Array,
  options: AtomicOptions = {},
): Promise<void> {
  const f = await AtomicFile.create(path, options);
  try {
    await f.handle.writeFile(data);
    await f.commit();
  } catch (err) {
    await f.abort();
    throw classifyFsError(err, path);
  }
}

/**
 * A fresh staging directory `<parent>/<prefix><owner>-XXXXXX`, after removing the ones with the
 * same prefix whose owners are gone (leftovers of killed runs).
 */
export async function stagingDir(parent: string, prefix: string): Promise<string> {
  for (const name of await readdir(parent).catch(() => [] as string[])) {
    if (name.startsWith(prefix) && (await ownerIsDead(name))) {
      await rm(join(parent, name), { recursive: true, force: true }).catch(() => undefined);
    }
  }
  try {
    return await mkdtemp(join(parent, `${prefix}${ownerTag()}-`));
  } catch (err) {
    throw classifyFsError(err, parent);
  }
}
