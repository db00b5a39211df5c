/**
 * Fetching an overlay given as a URL: streamed to a file next to where it is used (the
 * library's tmp dir), so it can be verified and applied with random access. HTTP errors and
 * network failures become NetworkError (exit 12), 404 a NotFoundError. Optional request headers
 * (a Glance token) and an expected sha256 of the body (Glance's os_hash_value).
 */
import { createWriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { Readable, Transform } from 'node:stream';
import { join } from 'node:path';
import type { ReadableStream as WebReadableStream } from 'node:stream/web';
import { createHash, randomBytes } from 'node:crypto';
import { CorruptInputError, NetworkError, NotFoundError } from '../util/errors.js';
import { onCleanup } from '../util/cleanup.js';
import { silent, type Progress } from '../util/progress.js';

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

export interface Fetched {
  path: string;
  bytes: number;
  remove(): Promise<void>;
}

export interface FetchOptions {
  /** Request headers, e.g. X-Auth-Token for Glance. */
  headers?: Record<string, string>;
  /** Expected sha256 of the body: a download that differs is removed and refused. */
  sha256?: string;
}

export async function fetchToFile(
  url: string,
  dir: string,
  progress: Progress = silent,
  timeoutMs = 300_000,
  options: FetchOptions = {},
): Promise<Fetched> {
  const path = join(dir, `download-${randomBytes(6).toString('hex')}.overlay`);
  const unregister = onCleanup(() => rm(path, { force: true }));
  const wantSha256 = options.sha256?.toLowerCase();
  const hash = wantSha256 ? createHash('sha256') : undefined;
  let res: Response;
  try {
    res = await fetch(url, { headers: options.headers, signal: AbortSignal.timeout(timeoutMs) });
  } catch (err) {
    unregister();
    throw new NetworkError(
      `cannot fetch ${url}: ${(err as Error).cause ? String((err as Error).cause) : (err as Error).message}`,
      { url },
    );
  }
  if (res.status === 404) {
    unregister();
    throw new NotFoundError(`overlay not found at ${url} (HTTP 404)`, { url });
  }
  if (!res.ok || !res.body) {
    unregister();
    throw new NetworkError(`cannot fetch ${url}: HTTP ${res.status} ${res.statusText}`, { url, status: res.status });
  }
  const total = Number(res.headers.get('content-length') ?? 0);
  progress.step(`downloading ${url}`, total || undefined);
  let bytes = 0;
  const count = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      bytes += chunk.length;
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
    );
  } catch (err) {
    await rm(path, { force: true });
    unregister();
    progress.fail('download failed');
    throw new NetworkError(`download of ${url} failed after ${bytes} bytes: ${(err as Error).message}`, { url });
  }
  if (total && bytes !== total) {
    await rm(path, { force: true });
    unregister();
    throw new NetworkError(`download of ${url} ended after ${bytes} of ${total} bytes`, { url });
  }
  if (hash && hash.digest('hex') !== wantSha256) {
    await rm(path, { force: true });
    unregister();
    progress.fail('download damaged');
    throw new CorruptInputError(`download of ${url} does not match its sha256 ${wantSha256}`, { url });
  }
  progress.done(`downloaded ${url}`);
  return {
    path,
    bytes,
    async remove() {
      await rm(path, { force: true });
      unregister();
    },
  };
}
