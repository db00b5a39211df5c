/**
 * One client connection: the handshake, then the transmission phase. Requests are served
 * concurrently (a read waiting on a slow fetch does not hold up the others) and each reply goes
 * out as one socket write, so replies never interleave. Memory is bounded per connection: at
 * most `maxInflight` requests and `maxInflightBytes` of payload are admitted at once — a request
 * counts until its reply has been handed to the kernel — and while that budget is spent the
 * socket is not read, so a client pipelining faster than we serve is held back by TCP/unix
 * socket flow control rather than by our heap.
 */
import type { Socket } from 'node:net';
import { ConnectionEnded, NbdError } from './errors.js';
import type { NbdExport, NbdExtent } from './export.js';
import { negotiate, type HandshakeConfig, type Negotiated } from './handshake.js';
import * as P from './protocol.js';
import { SocketReader } from './reader.js';
import type { NbdStats } from './stats.js';

export interface ConnectionConfig extends HandshakeConfig {
  id: number;
  maxInflight: number;
  maxInflightBytes: number;
  handshakeTimeoutMs: number;
  /** After close() has answered the last in-flight request, how long the client gets to hang up. */
  shutdownGraceMs: number;
  stats: NbdStats;
  onRead: ((offset: number, length: number) => void) | undefined;
  report(error: NbdError): void;
}

/** Socket bytes buffered ahead of the request parser before we stop reading. */
const READ_HIGH_WATER = 256 * 1024;
/** Most extents in one block-status reply (the spec's ceiling is 2^20). */
const MAX_REPLY_EXTENTS = 65536;
/** Largest extent length we send: fits 32 bits and keeps 4 KiB alignment. */
const MAX_EXTENT_LENGTH = 0xfffff000;

const READ_FLAGS = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF;
const WRITE_ZEROES_FLAGS = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE;
const BLOCK_STATUS_FLAGS = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE;

export class Connection {
  /** Resolves once the socket has closed and every callback this connection started has settled. */
  readonly settled: Promise<void>;
  private readonly reader: SocketReader;
  private readonly exp: NbdExport;
  private negotiated: Negotiated | null = null;
  private inflight = 0;
  private inflightBytes = 0;
  private admitWaiter: (() => void) | null = null;
  private readonly ops = new Set<Promise<void>>();
  private dead = false;
  /** close() was called: new requests get ESHUTDOWN. */
  private stopping = false;
  /** No more requests will be read (DISC, EOF, shutdown): end the socket once idle. */
  private closing = false;
  private ended = false;
  private corked = false;
  private socketClosed: Promise<void>;

  constructor(
    private readonly socket: Socket,
    private readonly cfg: ConnectionConfig,
  ) {
    this.exp = cfg.export;
    this.reader = new SocketReader(socket, READ_HIGH_WATER);
    socket.setNoDelay(true); // a no-op on unix sockets
    socket.on('error', (err: NodeJS.ErrnoException) => {
      this.dead = true;
      if (err.code !== 'ECONNRESET' && err.code !== 'EPIPE') {
        cfg.report(new NbdError('socket', `connection ${cfg.id}: ${err.message}`, this.where(), { cause: err }));
      }
    });
    this.socketClosed = new Promise<void>((resolve) => {
      socket.once('close', () => {
        this.dead = true;
        resolve();
      });
    });
    this.settled = this.run().then(async () => {
      await this.socketClosed;
      while (this.ops.size > 0) await Promise.allSettled(this.ops);
    });
  }

  /** Starts a graceful shutdown: ESHUTDOWN for new requests, end once in-flight ones are answered. */
  shutdown(): void {
    if (this.stopping) return;
    this.stopping = true;
    if (!this.negotiated) {
      this.socket.destroy();
      return;
    }
    this.closeWhenIdle();
  }

  private where(): { connection: number } {
    return { connection: this.cfg.id };
  }

  private async run(): Promise<void> {
    const timer = setTimeout(() => {
      this.cfg.report(new NbdError('protocol', `connection ${this.cfg.id}: handshake timed out`, this.where()));
      this.socket.destroy();
    }, this.cfg.handshakeTimeoutMs);
    try {
      this.negotiated = await negotiate(this.socket, this.reader, {
        name: this.cfg.name,
        description: this.cfg.description,
        export: this.exp,
        structuredReplies: this.cfg.structuredReplies,
        shuttingDown: () => this.stopping || this.cfg.shuttingDown(),
      });
      clearTimeout(timer);
      if (this.negotiated) {
        if (this.stopping) this.closeWhenIdle();
        await this.serve(this.negotiated);
      }
      this.closeWhenIdle();
    } catch (err) {
      clearTimeout(timer);
      if (err instanceof ConnectionEnded) {
        this.closeWhenIdle();
        return;
      }
      const e =
        err instanceof NbdError
          ? err
          : new NbdError('protocol', `connection ${this.cfg.id}: ${String(err)}`, this.where(), { cause: err });
      this.cfg.report(e);
      this.dead = true;
      this.socket.destroy();
    }
  }

  /** The transmission phase: parse, admit, dispatch; returns on NBD_CMD_DISC. */
  private async serve(neg: Negotiated): Promise<void> {
    for (;;) {
      const header = this.reader.take(P.REQUEST_SIZE) ?? (await this.reader.read(P.REQUEST_SIZE));
      const req = P.parseRequest(header);
      if (!req) throw new NbdError('protocol', `connection ${this.cfg.id}: bad request magic`, this.where());
      this.cfg.stats.requests++;
      if (req.type === P.NBD_CMD_DISC) return;

      const refusal = this.refusal(req, neg);
      if (req.type === P.NBD_CMD_WRITE) {
        // A payload we would not accept anyway is not worth reading (up to 4 GiB): hard disconnect,
        // which the spec allows for payloads this far past the advertised maximum.
        if (req.length > P.MAX_PAYLOAD) {
          throw new NbdError('protocol', `connection ${this.cfg.id}: write of ${req.length} bytes`, {
            ...this.where(),
            length: req.length,
          });
        }
        if (refusal !== null) {
          await this.reader.skip(req.length);
          await this.admit(0);
          this.dispatch(0, () => Promise.resolve([this.errorReply(req, refusal, neg)]));
          continue;
        }
        await this.admit(req.length);
        const payload = req.length > 0 ? await this.reader.read(req.length) : Buffer.alloc(0);
        this.dispatch(req.length, () => this.write(req, payload, neg));
        continue;
      }
      if (refusal !== null) {
        await this.admit(0);
        this.dispatch(0, () => Promise.resolve([this.errorReply(req, refusal, neg)]));
        continue;
      }
      const cost = req.type === P.NBD_CMD_READ ? req.length : 0;
      await this.admit(cost);
      this.dispatch(cost, () => this.execute(req, neg));
    }
  }

  /** The error a request gets before any callback runs, or null if it is acceptable. */
  private refusal(req: P.NbdRequest, neg: Negotiated): number | null {
    const { EINVAL, EPERM, ENOSPC, EOVERFLOW, ESHUTDOWN } = P.NbdErrno;
    if (this.stopping || this.cfg.shuttingDown()) return ESHUTDOWN;
    const size = this.exp.size;
    const inRange = req.offset <= size && req.length <= size - req.offset;
    switch (req.type) {
      case P.NBD_CMD_READ:
        if ((req.flags & ~READ_FLAGS) !== 0) return EINVAL;
        if ((req.flags & P.NBD_CMD_FLAG_DF) !== 0 && !neg.structured) return EINVAL;
        if (req.length > P.MAX_PAYLOAD) return neg.structured ? EOVERFLOW : EINVAL;
        return inRange ? null : EINVAL;
      case P.NBD_CMD_WRITE:
        if (this.exp.readOnly) return EPERM;
        if (!this.exp.write || (req.flags & ~P.NBD_CMD_FLAG_FUA) !== 0) return EINVAL;
        return inRange ? null : ENOSPC;
      case P.NBD_CMD_FLUSH:
        return (req.flags & ~P.NBD_CMD_FLAG_FUA) !== 0 ? EINVAL : null;
      case P.NBD_CMD_TRIM:
        if (this.exp.readOnly) return EPERM;
        if (!this.exp.trim || (req.flags & ~P.NBD_CMD_FLAG_FUA) !== 0) return EINVAL;
        return inRange ? null : EINVAL;
      case P.NBD_CMD_WRITE_ZEROES:
        if (this.exp.readOnly) return EPERM;
        if (!this.exp.writeZeroes || (req.flags & ~WRITE_ZEROES_FLAGS) !== 0) return EINVAL;
        return inRange ? null : ENOSPC;
      case P.NBD_CMD_BLOCK_STATUS:
        if (neg.allocationContext === null || (req.flags & ~BLOCK_STATUS_FLAGS) !== 0) return EINVAL;
        return inRange && req.length > 0 ? null : EINVAL;
      default:
        return EINVAL;
    }
  }

  /** Waits until `cost` more bytes (and one more request) fit the budget, then takes them. */
  private async admit(cost: number): Promise<void> {
    const { maxInflight, maxInflightBytes } = this.cfg;
    while (this.inflight >= maxInflight || (this.inflight > 0 && this.inflightBytes + cost > maxInflightBytes)) {
      await new Promise<void>((resolve) => {
        this.admitWaiter = resolve;
      });
    }
    this.inflight++;
    this.inflightBytes += cost;
    const stats = this.cfg.stats;
    if (this.inflight > stats.peakInflight) stats.peakInflight = this.inflight;
    if (this.inflightBytes > stats.peakInflightBytes) stats.peakInflightBytes = this.inflightBytes;
  }

  private release(cost: number): void {
    this.inflight--;
    this.inflightBytes -= cost;
    const wake = this.admitWaiter;
    this.admitWaiter = null;
    wake?.();
    if (this.closing && this.inflight === 0) this.closeWhenIdle();
  }

  /** Runs one admitted request to its reply; never rejects. */
  private dispatch(cost: number, work: () => Promise<Buffer[]>): void {
    const op = work()
      .then((reply) => this.send(reply))
      .catch((err: unknown) => {
        // execute() turns callback failures into error replies; reaching here is our own bug.
        this.cfg.report(new NbdError('export', `request failed unexpectedly: ${String(err)}`, this.where()));
      })
      .finally(() => {
        this.ops.delete(op);
        this.release(cost);
      });
    this.ops.add(op);
  }

  /**
   * Queues one reply, whole; resolves when the kernel has it (or the socket is gone). Replies
   * finished in the same tick leave in one writev: the socket is corked until the next tick.
   */
  private send(bufs: Buffer[]): Promise<void> {
    if (this.dead || this.ended || this.socket.destroyed) return Promise.resolve();
    if (!this.corked) {
      this.corked = true;
      this.socket.cork();
      process.nextTick(() => {
        this.corked = false;
        this.socket.uncork();
      });
    }
    return new Promise<void>((resolve) => {
      const done = (): void => resolve();
      for (let i = 0; i < bufs.length; i++) this.socket.write(bufs[i]!, i === bufs.length - 1 ? done : undefined);
    });
  }

  private errorReply(req: P.NbdRequest, errno: number, neg: Negotiated, message?: string): Buffer {
    this.cfg.stats.errorReplies++;
    if (!neg.structured) return P.encodeSimpleReply(errno, req.cookie);
    return P.encodeStructuredError(req.cookie, errno, message ?? errnoMessage(errno, req));
  }

  private exportFailed(req: P.NbdRequest, err: unknown, neg: Negotiated): Buffer {
    const op = P.COMMAND_NAMES[req.type] ?? String(req.type);
    const reason = err instanceof Error ? err.message : String(err);
    this.cfg.report(
      new NbdError(
        'export',
        `${op} of ${req.length} bytes at ${req.offset} failed: ${reason}`,
        { ...this.where(), op, offset: req.offset, length: req.length },
        { cause: err },
      ),
    );
    return this.errorReply(req, P.NbdErrno.EIO, neg, `${op} failed: ${reason}`);
  }

  private async execute(req: P.NbdRequest, neg: Negotiated): Promise<Buffer[]> {
    const ok = (): Buffer[] => [P.encodeSimpleReply(0, req.cookie)];
    try {
      switch (req.type) {
        case P.NBD_CMD_READ:
          return [await this.read(req, neg)];
        case P.NBD_CMD_FLUSH:
          await this.exp.flush?.();
          return ok();
        case P.NBD_CMD_TRIM:
          await this.exp.trim!(req.offset, req.length);
          return ok();
        case P.NBD_CMD_WRITE_ZEROES:
          await this.exp.writeZeroes!(req.offset, req.length, (req.flags & P.NBD_CMD_FLAG_FUA) !== 0);
          return ok();
        case P.NBD_CMD_BLOCK_STATUS:
          return [await this.blockStatus(req, neg)];
        default:
          return [this.errorReply(req, P.NbdErrno.EINVAL, neg)];
      }
    } catch (err) {
      return [this.exportFailed(req, err, neg)];
    }
  }

  private async read(req: P.NbdRequest, neg: Negotiated): Promise<Buffer> {
    const { offset, length, cookie } = req;
    if (length === 0) return neg.structured ? P.encodeStructuredDone(cookie) : P.encodeSimpleReply(0, cookie);
    if (this.cfg.onRead) {
      try {
        this.cfg.onRead(offset, length);
      } catch (err) {
        this.cfg.report(new NbdError('hook', `onRead threw: ${String(err)}`, this.where(), { cause: err }));
      }
    }
    const head = neg.structured ? P.OFFSET_DATA_HEADER_SIZE : P.SIMPLE_REPLY_SIZE;
    const out = Buffer.allocUnsafe(head + length);
    await this.exp.read(offset, length, out.subarray(head));
    if (neg.structured) P.writeOffsetDataHeader(out, cookie, offset, length);
    else P.writeSimpleReply(out, 0, cookie);
    this.cfg.stats.reads++;
    this.cfg.stats.bytesRead += length;
    return out;
  }

  private async write(req: P.NbdRequest, payload: Buffer, neg: Negotiated): Promise<Buffer[]> {
    try {
      await this.exp.write!(req.offset, payload, (req.flags & P.NBD_CMD_FLAG_FUA) !== 0);
    } catch (err) {
      return [this.exportFailed(req, err, neg)];
    }
    this.cfg.stats.writes++;
    this.cfg.stats.bytesWritten += payload.length;
    return [P.encodeSimpleReply(0, req.cookie)];
  }

  private async blockStatus(req: P.NbdRequest, neg: Negotiated): Promise<Buffer> {
    const got = await this.exp.blockStatus!(req.offset, req.length);
    const extents = clipExtents(got, req, this.exp.size);
    if (!extents) throw new Error('blockStatus returned no usable extent');
    return P.encodeBlockStatus(req.cookie, neg.allocationContext!, extents);
  }

  /** Ends the connection once nothing is in flight; destroys it if the client does not hang up. */
  private closeWhenIdle(): void {
    this.closing = true;
    if (this.inflight > 0 || this.ended) return;
    this.ended = true;
    if (this.socket.destroyed) return;
    this.socket.end();
    const t = setTimeout(() => this.socket.destroy(), this.cfg.shutdownGraceMs);
    t.unref();
    this.socket.once('close', () => clearTimeout(t));
  }
}

/**
 * Makes an export's extents legal for this request: consecutive from the offset, non-zero,
 * within the export, one only with REQ_ONE (and no longer than asked), otherwise stopping at the
 * first extent that reaches the requested end. Null if nothing usable came back.
 */
export function clipExtents(got: readonly NbdExtent[], req: P.NbdRequest, size: number): NbdExtent[] | null {
  const reqOne = (req.flags & P.NBD_CMD_FLAG_REQ_ONE) !== 0;
  const wanted = req.offset + req.length;
  const out: NbdExtent[] = [];
  let pos = req.offset;
  for (const e of got) {
    if (!Number.isSafeInteger(e.length) || e.length <= 0 || !Number.isInteger(e.flags)) break;
    let len = Math.min(e.length, size - pos, MAX_EXTENT_LENGTH);
    if (reqOne) len = Math.min(len, req.length);
    if (len <= 0) break;
    out.push({ length: len, flags: e.flags >>> 0 });
    pos += len;
    if (reqOne || pos >= wanted || len < e.length || out.length >= MAX_REPLY_EXTENTS) break;
  }
  return out.length > 0 ? out : null;
}

function errnoMessage(errno: number, req: P.NbdRequest): string {
  const op = P.COMMAND_NAMES[req.type] ?? `command ${req.type}`;
  switch (errno) {
    case P.NbdErrno.EPERM:
      return `${op}: the export is read-only`;
    case P.NbdErrno.EINVAL:
      return `${op} of ${req.length} bytes at ${req.offset}: invalid request`;
    case P.NbdErrno.EOVERFLOW:
      return `${op} of ${req.length} bytes is over the ${P.MAX_PAYLOAD}-byte maximum`;
    case P.NbdErrno.ENOSPC:
      return `${op} past the end of the export`;
    case P.NbdErrno.ESHUTDOWN:
      return 'server is shutting down';
    default:
      return `${op} failed (error ${errno})`;
  }
}
