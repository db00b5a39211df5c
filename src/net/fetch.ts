/**
 * Fetching an overlay given as a URL: streamed to a file next to where it is used (the
 * library's tmp dir), so it can be verified and applied with random access. HTTP errors and
 * network failures become NetworkError (exit 12), 404 a NotFoundError. Bounded: a server that
 * sends nothing for `idleMs` (connecting, or mid-body) is dropped, and a body longer than
 * `maxBytes` (by its Content-Length up front, or as it streams) is refused; a full disk is a
 * NoSpaceError. On every failure the partial file is removed. Optional request headers (a
 * Glance token) and an expected sha256 of the body (Glance's os_hash_value).
 */
import { createWriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { Readable, Transform } from 'node:stream';
import { join } from 'node:path';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { createHash, randomBytes } from 'node:crypto';
import { CloudletError, CorruptInputError, NetworkError, NotFoundError, classifyFsError } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { ownerTag } from '../util/owner.js';
import { silent, type Progress } from '../util/progress.js';

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

export interface FetchLimits {
  /** No byte for this long (connecting or mid-body) ends the download. Default 30 s. */
  idleMs?: number;
  /** Largest body accepted. Default 32 GiB. */
  maxBytes?: number;
  /** The whole download must end within this (default: no bound but the idle timeout). */
  timeoutMs?: number;
}

export interface FetchOptions {
  /** Request headers, e.g. X-Auth-Token for Glance. */
  headers?: Record<string, string>;
  /** Expected sha256 of the body: a download that differs is removed and refused. */
  sha256?: string;
}

export const DEFAULT_IDLE_MS = 30_000;
export const DEFAULT_MAX_BYTES = 32 * 2 ** 30;

export interface Fetched {
  path: string;
  bytes: number;
  remove(): Promise<void>;
}

export async function fetchToFile(
  url: string,
  dir: string,
  progress: Progress = silent,
  bounds: FetchLimits | number = {},
  options: FetchOptions = {},
): Promise<Fetched> {
  // A bare number is the overall timeout (the form older callers use).
  const limits: FetchLimits = typeof bounds === 'number' ? { timeoutMs: bounds } : bounds;
  const idleMs = limits.idleMs ?? DEFAULT_IDLE_MS;
  const maxBytes = limits.maxBytes ?? DEFAULT_MAX_BYTES;
  const wantSha256 = options.sha256?.toLowerCase();
  const hash = wantSha256 ? createHash('sha256') : undefined;
  const path = join(dir, `download-${ownerTag()}-${randomBytes(6).toString('hex')}.overlay`);
  const remove = (): Promise<void> => rm(path, { force: true });
  const unregister = onCleanup(remove);
  const abort = new AbortController();
  let idle: NodeJS.Timeout | undefined;
  const arm = (): void => {
    clearTimeout(idle);
    idle = setTimeout(
      () => abort.abort(new NetworkError(`${url}: no data for ${idleMs} ms (stalled)`, { url })),
      idleMs,
    );
  };
  let bytes = 0;
  const total = limits.timeoutMs
    ? setTimeout(
        () => abort.abort(new NetworkError(`${url}: not complete after ${limits.timeoutMs} ms`, { url })),
        limits.timeoutMs,
      )
    : undefined;
  try {
    arm();
    let res: Response;
    try {
      res = await fetch(url, { headers: options.headers, signal: abort.signal });
    } catch (err) {
      throw abortReason(abort) ?? new NetworkError(`cannot fetch ${url}: ${describe(err)}`, { url });
    }
    if (res.status === 404) throw new NotFoundError(`overlay not found at ${url} (HTTP 404)`, { url });
    if (!res.ok || !res.body) {
      throw new NetworkError(`cannot fetch ${url}: HTTP ${res.status} ${res.statusText}`, { url, status: res.status });
    }
    const declared = Number(res.headers.get('content-length') ?? 0);
    if (declared > maxBytes) {
      throw new NetworkError(`${url} is ${declared} bytes, more than the limit of ${maxBytes} (--max-size)`, { url });
    }
    progress.step(`downloading ${url}`, declared || undefined);
    const count = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        bytes += chunk.length;
        arm();
        if (bytes > maxBytes) {
          cb(new NetworkError(`${url}: more than the limit of ${maxBytes} bytes (--max-size)`, { url }));
          return;
        }
        hash?.update(chunk);
        progress.advance(chunk.length);
        cb(null, chunk);
      },
    });
    try {
      await pipeline(
        Readable.fromWeb(res.body as WebReadableStream<Uint8Array>),
        count,
        createWriteStream(path, { flags: 'wx' }),
        { signal: abort.signal },
      );
    } catch (err) {
      const reason = abortReason(abort);
      if (reason) throw reason;
      if (err instanceof CloudletError) throw err;
      const fsErr = classifyFsError(err, path);
      if (fsErr instanceof CloudletError) throw fsErr;
      throw new NetworkError(`download of ${url} failed after ${bytes} bytes: ${describe(err)}`, { url });
    }
    if (declared && bytes !== declared) {
      throw new NetworkError(`download of ${url} ended after ${bytes} of ${declared} bytes`, { url });
    }
    if (hash && hash.digest('hex') !== wantSha256) {
      throw new CorruptInputError(`download of ${url} does not match its sha256 ${wantSha256}`, { url });
    }
    progress.done(`downloaded ${url}`);
  } catch (err) {
    progress.fail('download failed');
    abort.abort();
    await remove();
    unregister();
    throw err;
  } finally {
    clearTimeout(idle);
    clearTimeout(total);
  }
  return {
    path,
    bytes,
    async remove() {
      await remove();
      unregister();
    },
  };
}

function abortReason(abort: AbortController): CloudletError | undefined {
  const r: unknown = abort.signal.reason;
  return abort.signal.aborted && r instanceof CloudletError ? r : undefined;
}

function describe(err: unknown): string {
  const e = err as Error & { cause?: { message?: unknown; code?: unknown } };
  const c = e.cause;
  if (!c) return e.message;
  return [c.code, c.message].filter((x) => typeof x === 'string').join(' ') || e.message;
}
