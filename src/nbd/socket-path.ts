/**
 * A unix socket that appears at its path atomically, mode 0600, and is never stolen from a live
 * server. We bind under a fresh 0700 directory next to the target (so no one can connect before
 * the chmod, whatever the umask), then hard-link the socket to its final name: link() refuses to
 * replace anything, so two servers racing for one path cannot both win. An existing file there
 * is removed first only if it is a socket nobody listens on (left by a crashed process).
 * On close the file is removed only if it is still the one we linked (same device and inode).
 */
import { connect, type Server } from 'node:net';
import { chmod, link, lstat, mkdtemp, rmdir, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { BusyError, UsageError } from '../util/errors.js';

export interface BoundSocket {
  path: string;
  dev: number;
  ino: number;
}

/** sun_path holds 108 bytes including the terminating NUL. */
const MAX_SOCKET_PATH = 107;

export async function listenUnix(server: Server, path: string): Promise<BoundSocket> {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) {
    throw new UsageError(`socket path is longer than ${MAX_SOCKET_PATH} bytes: ${path}`, { path });
  }
  const existing = await lstat(path).catch(ignoreMissing);
  if (existing) {
    if (!existing.isSocket()) throw new BusyError(`${path} exists and is not a socket`, { path });
    if (await somebodyListens(path)) throw new BusyError(`a server is already listening on ${path}`, { path });
  }
  const tmpDir = await mkdtemp(join(dirname(path), '.nbd'));
  const tmp = join(tmpDir, 's');
  try {
    if (Buffer.byteLength(tmp) > MAX_SOCKET_PATH) {
      throw new UsageError(`socket path is too long to bind through a temporary name: ${path}`, { path });
    }
    await listenOn(server, tmp);
    await chmod(tmp, 0o600);
    if (existing) await unlink(path).catch(ignoreMissing);
    try {
      await link(tmp, path);
    } catch (err) {
      server.close();
      if ((err as NodeJS.ErrnoException).code === 'EEXIST') {
        throw new BusyError(`another server took ${path} while we started`, { path });
      }
      throw err;
    }
    const st = await lstat(path);
    return { path, dev: st.dev, ino: st.ino };
  } finally {
    await unlink(tmp).catch(ignoreMissing);
    await rmdir(tmpDir).catch(() => undefined);
  }
}

/** Removes the socket file if it is still ours; a successor's socket is left alone. */
export async function removeSocketFile(bound: BoundSocket): Promise<void> {
  const st = await lstat(bound.path).catch(ignoreMissing);
  if (st && st.dev === bound.dev && st.ino === bound.ino) await unlink(bound.path).catch(ignoreMissing);
}

function listenOn(server: Server, path: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once('error', onError);
    server.listen(path, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

/** True if connecting succeeds, or fails for a reason other than "nobody there" (be safe). */
function somebodyListens(path: string): Promise<boolean> {
  return new Promise<boolean>((resolve) => {
    const s = connect(path);
    const done = (answer: boolean): void => {
      s.destroy();
      resolve(answer);
    };
    s.setTimeout(2000, () => done(true));
    s.once('connect', () => done(true));
    s.once('error', (err: NodeJS.ErrnoException) => done(err.code !== 'ECONNREFUSED' && err.code !== 'ENOENT'));
  });
}

function ignoreMissing(err: NodeJS.ErrnoException): null {
  if (err.code === 'ENOENT') return null;
  throw err;
}
