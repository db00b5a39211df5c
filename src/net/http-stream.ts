/**
 * An HTTP(S) body as a stream of buffers that survives a dropped connection: when the body
 * breaks off (network error, idle timeout, a server that closes early) the rest is asked for
 * again with a Range request tied to the same entity (If-Range on its ETag or Last-Modified),
 * a few times with backoff. Pulled by the consumer, so a slow consumer slows the download
 * (TCP backpressure) and memory stays at a few buffers. Also: one ranged GET, for reading a
 * part of an overlay (the index, a segment) without the rest.
 *
 * Failures: 404 → NotFoundError; other HTTP statuses, refused connections, more bytes than
 * allowed, or a body that cannot be resumed → NetworkError; nothing for `idleMs` → a drop.
 */
import { NetworkError, NotFoundError } from '../util/errors.js';
import { silent, type Progress } from '../util/progress.js';

export interface HttpStreamOptions {
  headers?: Record<string, string>;
  /** No byte for this long counts as a dropped connection. Default 30 s. */
  idleMs?: number;
  /** Resumptions after drops before giving up. Default 5. */
  retries?: number;
  /** Refuse bodies longer than this (default: no bound but the server's Content-Length). */
  maxBytes?: number;
  progress?: Progress;
  /** Label for the progress step. */
  label?: string;
}

export interface HttpStreamInfo {
  /** Content-Length of the whole entity, when the server said. */
  size: number | undefined;
  /** Connections dropped and resumed. */
  resumed: number;
  /** Bytes received so far. */
  received: number;
}

export function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

function describe(err: unknown): string {
  const e = err as Error & { cause?: unknown };
  const cause = e.cause as (Error & { code?: string }) | undefined;
  return cause ? `${cause.code ?? ''} ${cause.message}`.trim() : e.message;
}

interface Opened {
  res: Response;
  abort: AbortController;
}

async function request(
  url: string,
  headers: Record<string, string>,
  idleMs: number,
  method: 'GET' | 'HEAD' = 'GET',
): Promise<Opened> {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(new Error(`no answer in ${idleMs} ms`)), idleMs);
  try {
    const res = await fetch(url, { method, headers, signal: abort.signal, redirect: 'follow' });
    return { res, abort };
  } catch (err) {
    throw new NetworkError(`cannot fetch ${url}: ${describe(err)}`, { url });
  } finally {
    clearTimeout(timer);
  }
}

function statusError(url: string, res: Response): Error {
  if (res.status === 404) return new NotFoundError(`not found at ${url} (HTTP 404)`, { url, status: 404 });
  return new NetworkError(`cannot fetch ${url}: HTTP ${res.status} ${res.statusText}`, { url, status: res.status });
}

/**
 * A resumable download. Iterate `body()` once; `info` reports what happened. Throws as
 * described above; a consumer that stops early should call `close()`.
 */
export class HttpStream {
  readonly info: HttpStreamInfo = { size: undefined, resumed: 0, received: 0 };
  private current: Opened | undefined;
  private closed = false;

  constructor(
    readonly url: string,
    private readonly opts: HttpStreamOptions = {},
  ) {}

  async *body(): AsyncGenerator<Buffer> {
    const progress = this.opts.progress ?? silent;
    const idleMs = this.opts.idleMs ?? 30_000;
    const retries = this.opts.retries ?? RETRIES;
    let validator: string | undefined;
    let failures = 0;
    let stepped = false;
    for (;;) {
      const headers: Record<string, string> = { ...this.opts.headers };
      if (this.info.received > 0) {
        headers['range'] = `bytes=${this.info.received}-`;
        if (validator) headers['if-range'] = validator;
      }
      let opened: Opened;
      try {
        opened = await request(this.url, headers, idleMs);
      } catch (err) {
        // A refused first connection is an answer; later ones may be a blip.
        if (this.info.received === 0 || ++failures > retries) throw err;
        await backoff(failures);
        continue;
      }
      this.current = opened;
      const { res } = opened;
      if (this.info.received === 0) {
        if (!res.ok || !res.body) throw statusError(this.url, res);
        const len = res.headers.get('content-length');
        this.info.size = len !== null && /^\d+$/.test(len) ? Number(len) : undefined;
        validator = res.headers.get('etag') ?? res.headers.get('last-modified') ?? undefined;
        if (this.info.size !== undefined && this.opts.maxBytes !== undefined && this.info.size > this.opts.maxBytes) {
          opened.abort.abort();
          throw new NetworkError(
            `${this.url} is ${this.info.size} bytes, more than the ${this.opts.maxBytes} allowed`,
            {
              url: this.url,
            },
          );
        }
        if (!stepped) {
          progress.step(this.opts.label ?? `downloading ${this.url}`, this.info.size);
          stepped = true;
        }
      } else if (res.status !== 206 || !rangeStartsAt(res.headers.get('content-range'), this.info.received)) {
        opened.abort.abort();
        throw new NetworkError(
          `the download of ${this.url} broke off after ${this.info.received} bytes and the server cannot resume it ` +
            `(HTTP ${res.status} to a Range request)`,
          { url: this.url, status: res.status },
        );
      }
      const reader = res.body!.getReader();
      let dropped: unknown;
      try {
        for (;;) {
          const r = await readWithin(reader, idleMs, opened.abort);
          if (r.done) break;
          const chunk = Buffer.from(r.value.buffer, r.value.byteOffset, r.value.byteLength);
          this.info.received += chunk.length;
          if (this.opts.maxBytes !== undefined && this.info.received > this.opts.maxBytes) {
            opened.abort.abort();
            throw new NetworkError(`${this.url} sent more than the ${this.opts.maxBytes} bytes allowed`, {
              url: this.url,
            });
          }
          progress.advance(chunk.length);
          failures = 0;
          yield chunk;
          if (this.closed) return;
        }
      } catch (err) {
        if (err instanceof NetworkError || this.closed) throw err;
        dropped = err;
      } finally {
        reader.releaseLock();
      }
      const size = this.info.size;
      if (dropped === undefined && (size === undefined || this.info.received >= size)) {
        if (size !== undefined && this.info.received > size) {
          throw new NetworkError(`${this.url} sent ${this.info.received} bytes, its Content-Length said ${size}`, {
            url: this.url,
          });
        }
        progress.done(`downloaded ${this.url}`);
        return;
      }
      // Broke off (error, idle, or closed before Content-Length): resume from here.
      if (++failures > retries) {
        progress.fail('download failed');
        throw new NetworkError(
          `the download of ${this.url} broke off after ${this.info.received}${size !== undefined ? ` of ${size}` : ''} bytes ` +
            `${retries + 1} times${dropped ? ` (${describe(dropped)})` : ''}`,
          { url: this.url },
        );
      }
      this.info.resumed++;
      await backoff(failures);
    }
  }

  close(): void {
    this.closed = true;
    this.current?.abort.abort();
  }
}

function rangeStartsAt(contentRange: string | null, start: number): boolean {
  const m = contentRange ? /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(contentRange.trim()) : null;
  return m !== null && Number(m[1]) === start;
}

/** Attempts after a failure, for a streamed body and for a ranged read alike. */
const RETRIES = 5;

function backoff(failures: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * 2 ** failures)));
}

type ReadableStreamReadResultOf = Awaited<ReturnType<ReadableStreamDefaultReader<Uint8Array>['read']>>;

/** reader.read() that counts as dropped after `idleMs` without data. */
async function readWithin(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  idleMs: number,
  abort: AbortController,
): Promise<ReadableStreamReadResultOf> {
  let timer: NodeJS.Timeout | undefined;
  const idle = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      abort.abort();
      reject(new Error(`no data for ${idleMs} ms`));
    }, idleMs);
  });
  try {
    return await Promise.race([reader.read(), idle]);
  } finally {
    clearTimeout(timer);
  }
}

/** GET bytes [start, end) of `url` (one request; the server must honour Range). */
export async function fetchRange(
  url: string,
  start: number,
  end: number,
  opts: { headers?: Record<string, string>; idleMs?: number } = {},
): Promise<Buffer> {
  const idleMs = opts.idleMs ?? 30_000;
  const { res, abort } = await request(url, { ...opts.headers, range: `bytes=${start}-${end - 1}` }, idleMs);
  if (res.status !== 206) {
    abort.abort();
    if (!res.ok) throw statusError(url, res);
    throw new NetworkError(`${url} does not answer Range requests (HTTP ${res.status})`, { url, status: res.status });
  }
  const out = Buffer.allocUnsafe(end - start);
  let got = 0;
  const reader = res.body!.getReader();
  try {
    for (;;) {
      const r = await readWithin(reader, idleMs, abort);
      if (r.done) break;
      if (got + r.value.byteLength > out.length)
        throw new NetworkError(`${url} sent more than the range asked for`, { url });
      out.set(r.value, got);
      got += r.value.byteLength;
    }
  } catch (err) {
    if (err instanceof NetworkError) throw err;
    throw new NetworkError(`reading bytes ${start}-${end - 1} of ${url} failed: ${describe(err)}`, { url });
  } finally {
    reader.releaseLock();
  }
  if (got !== out.length) throw new NetworkError(`${url} sent ${got} of the ${out.length} bytes asked for`, { url });
  return out;
}

/**
 * Random access to `url` by ranged GETs (its size from a HEAD request): what reading an
 * overlay's footer, index and single segments needs while the body still streams.
 */
export async function httpRange(
  url: string,
  opts: { headers?: Record<string, string>; idleMs?: number; retries?: number } = {},
): Promise<{ size: number; read(offset: number, length: number): Promise<Buffer>; close(): Promise<void> }> {
  const idleMs = opts.idleMs ?? 30_000;
  const { res, abort } = await request(url, { ...opts.headers }, idleMs, 'HEAD');
  abort.abort();
  if (!res.ok) throw statusError(url, res);
  const len = res.headers.get('content-length');
  if (len === null || !/^\d+$/.test(len)) throw new NetworkError(`${url}: the server does not say its size`, { url });
  const etag = res.headers.get('etag') ?? res.headers.get('last-modified') ?? undefined;
  const headers = { ...opts.headers, ...(etag ? { 'if-range': etag } : {}) };
  return {
    size: Number(len),
    read: async (offset, length) => {
      // A blip costs a retry, not a failed read (early start: the guest would see EIO).
      for (let failures = 0; ; failures++) {
        try {
          return await fetchRange(url, offset, offset + length, { headers, idleMs });
        } catch (err) {
          const status = err instanceof NetworkError ? err.details['status'] : undefined;
          const retryable = err instanceof NetworkError && (typeof status !== 'number' || status >= 500);
          if (!retryable || failures >= (opts.retries ?? RETRIES)) throw err;
          await backoff(failures + 1);
        }
      }
    },
    close: () => Promise.resolve(),
  };
}
