/**
 * An HTTP server for one overlay that holds its front-to-back stream at a byte offset until the
 * test lets it go (then goes on, or drops the connection), while ranged reads are answered at
 * once: what early start meets on a slow link, made deterministic. Optionally one byte of the
 * stream past the gate arrives flipped (ranged reads stay intact).
 */
import { createServer, type Server } from 'node:http';

export interface GateOptions {
  /** Stream bytes [0, gate) go out at once; the rest waits for release(). */
  gate: number;
  /** After release: go on, or drop the connection (the client resumes with a Range request). */
  after: 'continue' | 'drop';
  /** Offset (≥ gate) of a byte sent flipped in the stream. */
  corruptAt?: number;
  /** Offset of a byte sent flipped in every ranged read that holds it (the stream stays intact). */
  corruptRangesAt?: number;
}

export interface GateServer {
  url: string;
  /** Bytes sent on front-to-back streams, and ranged reads answered (not counting resumes). */
  readonly stats: { streamBytes: number; rangedReads: number; resumes: number };
  /** The requests seen (for a failing test's message). */
  readonly log: readonly string[];
  /** Resolves once a stream has reached the gate. */
  reachedGate: Promise<void>;
  release(): void;
  close(): Promise<void>;
}

export async function startGateServer(body: Buffer, opts: GateOptions): Promise<GateServer> {
  const etag = `"gate-${body.length}"`;
  const stats = { streamBytes: 0, rangedReads: 0, resumes: 0 };
  const log: string[] = [];
  const t0 = Date.now();
  let release!: () => void;
  const released = new Promise<void>((r) => (release = r));
  let reached!: () => void;
  const reachedGate = new Promise<void>((r) => (reached = r));
  const tail = Buffer.from(body.subarray(opts.gate));
  if (opts.corruptAt !== undefined) tail[opts.corruptAt - opts.gate]! ^= 0x20;

  const server: Server = createServer((req, res) => {
    log.push(`${Date.now() - t0}ms ${req.method} ${req.headers.range ?? '-'} ${String(req.headers['if-range'] ?? '')}`);
    if (req.url !== '/app.overlay') {
      res.writeHead(404).end();
      return;
    }
    const common = { etag, 'accept-ranges': 'bytes' };
    if (req.method === 'HEAD') {
      res.writeHead(200, { ...common, 'content-length': String(body.length) }).end();
      return;
    }
    const m = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    const sameEntity = req.headers['if-range'] === undefined || req.headers['if-range'] === etag;
    if (m && sameEntity) {
      const start = Number(m[1]);
      const end = m[2] ? Number(m[2]) + 1 : body.length;
      if (m[2]) stats.rangedReads++;
      else stats.resumes++;
      res.writeHead(206, {
        ...common,
        'content-range': `bytes ${start}-${end - 1}/${body.length}`,
        'content-length': String(end - start),
      });
      // A resumed stream is the stream: past the gate it carries the flipped byte too.
      let slice = !m[2] && start >= opts.gate ? tail.subarray(start - opts.gate) : body.subarray(start, end);
      const bad = opts.corruptRangesAt;
      if (m[2] && bad !== undefined && bad >= start && bad < end) {
        slice = Buffer.from(slice);
        slice[bad - start]! ^= 0x20;
      }
      stats.streamBytes += m[2] ? 0 : slice.length;
      res.end(slice);
      return;
    }
    res.writeHead(200, { ...common, 'content-length': String(body.length) });
    res.write(body.subarray(0, opts.gate));
    stats.streamBytes += opts.gate;
    reached();
    void released.then(() => {
      if (opts.after === 'drop') {
        res.destroy();
        return;
      }
      stats.streamBytes += tail.length;
      res.end(tail);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const port = (server.address() as { port: number }).port;
  return {
    url: `http://127.0.0.1:${port}/app.overlay`,
    stats,
    log,
    reachedGate,
    release: () => release(),
    close: () =>
      new Promise<void>((r) => {
        release();
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}
