/**
 * Readiness of a guest service. With QEMU user-mode networking the host side of a port forward
 * accepts TCP connections before anything listens in the guest (and then closes them), so an
 * open port means nothing: ready means a real HTTP answer. waitTcp is only for non-HTTP
 * services, and even then proves only that the connection is not refused at once.
 */
import { request } from 'node:http';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { TimeoutError } from '../util/errors.js';

export interface HttpAnswer {
  status: number;
  body: string;
  /** Time of this one request. */
  elapsedMs: number;
}

export interface WaitHttpOptions {
  /** Total wait. Default 60 s. */
  timeoutMs?: number;
  /** Pause between attempts. Default 50 ms. */
  intervalMs?: number;
  /** One request's limit (a guest CGI under TCG can take a second). Default 5 s. */
  requestTimeoutMs?: number;
  /** Which answers count as ready. Default: any status below 500. */
  accept?: (answer: HttpAnswer) => boolean;
  /** Stop waiting when this aborts (e.g. QemuVm.exitSignal); its reason is thrown. */
  signal?: AbortSignal;
}

export interface WaitResult extends HttpAnswer {
  attempts: number;
  /** From the call to the accepted answer. */
  waitedMs: number;
}

/** One GET without keep-alive; rejects on network errors and after timeoutMs. */
export function httpGet(url: string, options: { timeoutMs?: number } = {}): Promise<HttpAnswer> {
  const timeoutMs = options.timeoutMs ?? 5000;
  const started = performance.now();
  return new Promise<HttpAnswer>((resolve, reject) => {
    const req = request(url, { method: 'GET', agent: false, headers: { connection: 'close' } }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () =>
        resolve({
          status: res.statusCode ?? 0,
          body: Buffer.concat(chunks).toString('utf8'),
          elapsedMs: performance.now() - started,
        }),
      );
    });
    req.setTimeout(timeoutMs, () => {
      req.destroy(new TimeoutError(`GET ${url} took over ${timeoutMs} ms`, { url }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** Polls `url` until it answers acceptably; TimeoutError with the last failure otherwise. */
export async function waitHttp(url: string, options: WaitHttpOptions = {}): Promise<WaitResult> {
  const timeoutMs = options.timeoutMs ?? 60_000;
  const intervalMs = options.intervalMs ?? 50;
  const accept = options.accept ?? ((a: HttpAnswer) => a.status > 0 && a.status < 500);
  const started = performance.now();
  const deadline = started + timeoutMs;
  let attempts = 0;
  let last = 'no attempt';
  for (;;) {
    options.signal?.throwIfAborted();
    attempts++;
    const remaining = deadline - performance.now();
    try {
      const answer = await httpGet(url, {
        timeoutMs: Math.max(100, Math.min(options.requestTimeoutMs ?? 5000, remaining)),
      });
      if (accept(answer)) return { ...answer, attempts, waitedMs: performance.now() - started };
      last = `HTTP ${answer.status}`;
    } catch (err) {
      last = err instanceof Error ? err.message || (err as NodeJS.ErrnoException).code || 'error' : String(err);
    }
    options.signal?.throwIfAborted();
    if (performance.now() + intervalMs > deadline) {
      throw new TimeoutError(`${url} gave no acceptable HTTP answer within ${timeoutMs} ms (last: ${last})`, {
        url,
        attempts,
        last,
      });
    }
    await sleep(intervalMs);
  }
}

/** Polls until a TCP connection to host:port succeeds. */
export async function waitTcp(
  host: string,
  port: number,
  options: { timeoutMs?: number; intervalMs?: number; signal?: AbortSignal } = {},
): Promise<void> {
  const timeoutMs = options.timeoutMs ?? 30_000;
  const deadline = performance.now() + timeoutMs;
  let last = 'no attempt';
  for (;;) {
    options.signal?.throwIfAborted();
    try {
      await new Promise<void>((resolve, reject) => {
        const s = connect({ host, port });
        s.setTimeout(2000, () => s.destroy(new Error('connect timeout')));
        s.once('connect', () => {
          s.destroy();
          resolve();
        });
        s.once('error', reject);
      });
      return;
    } catch (err) {
      last = err instanceof Error ? err.message : String(err);
    }
    if (performance.now() > deadline) {
      throw new TimeoutError(`${host}:${port} refused connections for ${timeoutMs} ms (last: ${last})`, {
        host,
        port,
      });
    }
    await sleep(options.intervalMs ?? 50);
  }
}
