/**
 * An NBD server for one export, so that QEMU can use a disk whose bytes we produce on demand
 * (early start: reads answered from rebuilt chunks, the base disk, or a fetch made now).
 * Listens on a unix socket (and, for tests, TCP on 127.0.0.1); QEMU reconnects freely, and any
 * number of connections up to `maxConnections` share the export. Clients never crash the
 * server: protocol violations drop that client, callback failures become EIO, and both are
 * reported through `onError`. close() stops listening, answers what is in flight, ends every
 * connection and removes the socket file.
 */
import { createServer, type Server, type Socket } from 'node:net';
import { UsageError } from '../util/errors.js';
import { Connection } from './connection.js';
import { NbdError } from './errors.js';
import type { NbdExport } from './export.js';
import { MAX_STRING } from './protocol.js';
import { listenUnix, removeSocketFile, type BoundSocket } from './socket-path.js';
import { emptyStats, type NbdStats } from './stats.js';

export interface NbdServerOptions {
  /** Export name clients ask for (QEMU: `export=NAME`; URI: nbd+unix:///NAME?socket=PATH). */
  name: string;
  export: NbdExport;
  /** Shown by `qemu-nbd -L` and NBD_INFO_DESCRIPTION. */
  description?: string;
  /**
   * Offer structured replies and, when the export has blockStatus, `base:allocation`.
   * Default true; false refuses NBD_OPT_STRUCTURED_REPLY with NBD_REP_ERR_UNSUP.
   */
  structuredReplies?: boolean;
  /** Requests in flight per connection before we stop reading its socket. Default 64. */
  maxInflight?: number;
  /** Read/write payload bytes in flight per connection (one request always fits). Default 64 MiB. */
  maxInflightBytes?: number;
  /** Connections open at once; more are closed on accept. Default 16. */
  maxConnections?: number;
  /** A connection that has not finished its handshake by then is dropped. Default 10 s. */
  handshakeTimeoutMs?: number;
  /** On close(), how long a client gets to hang up after its last reply. Default 1 s. */
  shutdownGraceMs?: number;
  /** Called for every READ as it starts (offset, length): which ranges a guest touches first. */
  onRead?: (offset: number, length: number) => void;
  /** Export callback failures, client protocol violations, socket errors. Must not throw. */
  onError?: (error: NbdError) => void;
}

const MiB = 1024 * 1024;

export class NbdServer {
  private readonly servers: Server[] = [];
  private readonly bound: BoundSocket[] = [];
  private readonly connections = new Set<Connection>();
  private readonly counters = emptyStats();
  private nextId = 1;
  private closing: Promise<void> | null = null;
  private readonly opts: Required<Omit<NbdServerOptions, 'onRead' | 'onError'>> &
    Pick<NbdServerOptions, 'onRead' | 'onError'>;

  constructor(options: NbdServerOptions) {
    const o = {
      description: '',
      structuredReplies: true,
      maxInflight: 64,
      maxInflightBytes: 64 * MiB,
      maxConnections: 16,
      handshakeTimeoutMs: 10_000,
      shutdownGraceMs: 1000,
      ...options,
    };
    if (Buffer.byteLength(o.name) > MAX_STRING) throw new UsageError(`export name over ${MAX_STRING} bytes`);
    if (!Number.isSafeInteger(o.export.size) || o.export.size < 0) {
      throw new UsageError(`export size must be a non-negative integer, not ${o.export.size}`);
    }
    if (!o.export.readOnly && !o.export.write) throw new UsageError('a writable export needs a write callback');
    for (const k of ['maxInflight', 'maxInflightBytes', 'maxConnections'] as const) {
      if (!Number.isSafeInteger(o[k]) || o[k] < 1) throw new UsageError(`${k} must be a positive integer`);
    }
    this.opts = o;
  }

  /** Serves on a unix socket at `path` (mode 0600; a stale socket file is replaced). */
  async listen(path: string): Promise<void> {
    const server = this.newServer();
    this.bound.push(await listenUnix(server, path));
    this.servers.push(server);
  }

  /** Serves on TCP 127.0.0.1 (port 0: any free one); resolves with the port. For tests. */
  async listenTcp(port = 0): Promise<number> {
    const server = this.newServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      server.listen(port, '127.0.0.1', () => {
        server.off('error', reject);
        resolve();
      });
    });
    this.servers.push(server);
    const address = server.address();
    return typeof address === 'object' && address ? address.port : port;
  }

  /** The unix socket paths served. */
  get paths(): string[] {
    return this.bound.map((b) => b.path);
  }

  /** A snapshot of the counters. */
  get stats(): NbdStats {
    return { ...this.counters };
  }

  /** The URI qemu-img and qemu-io take for the first unix socket. */
  uri(): string {
    const path = this.bound[0]?.path;
    if (!path) throw new UsageError('the server does not listen on a unix socket');
    return nbdUnixUri(path, this.opts.name);
  }

  /**
   * Stops listening, answers requests already in flight (new ones get ESHUTDOWN), ends every
   * connection, removes the socket files; resolves when every export callback has settled.
   * Calling it again returns the same promise.
   */
  close(): Promise<void> {
    this.closing ??= this.shutdown();
    return this.closing;
  }

  private async shutdown(): Promise<void> {
    const stopped = this.servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    await Promise.all(this.bound.map((b) => removeSocketFile(b)));
    for (const c of this.connections) c.shutdown();
    await Promise.all([...stopped, ...[...this.connections].map((c) => c.settled)]);
  }

  private newServer(): Server {
    if (this.closing) throw new UsageError('the server is closed');
    const server = createServer({ allowHalfOpen: true, pauseOnConnect: false }, (socket) => this.accept(socket));
    server.on('error', (err) => this.report(new NbdError('socket', `listener: ${err.message}`, {}, { cause: err })));
    return server;
  }

  private accept(socket: Socket): void {
    const id = this.nextId++;
    this.counters.connections++;
    if (this.closing || this.connections.size >= this.opts.maxConnections) {
      socket.on('error', () => undefined);
      socket.destroy();
      if (!this.closing) {
        this.report(new NbdError('protocol', `connection ${id} refused: ${this.opts.maxConnections} already open`));
      }
      return;
    }
    const o = this.opts;
    const conn = new Connection(socket, {
      id,
      name: o.name,
      description: o.description,
      export: o.export,
      structuredReplies: o.structuredReplies,
      shuttingDown: () => this.closing !== null,
      maxInflight: o.maxInflight,
      maxInflightBytes: o.maxInflightBytes,
      handshakeTimeoutMs: o.handshakeTimeoutMs,
      shutdownGraceMs: o.shutdownGraceMs,
      stats: this.counters,
      onRead: o.onRead,
      report: (e) => this.report(e),
    });
    this.connections.add(conn);
    this.counters.activeConnections++;
    socket.once('close', () => this.counters.activeConnections--);
    conn.settled.then(
      () => this.connections.delete(conn),
      () => this.connections.delete(conn),
    );
  }

  private report(error: NbdError): void {
    try {
      this.opts.onError?.(error);
    } catch {
      // a throwing hook must not take the server down
    }
  }
}

/** nbd+unix:///NAME?socket=PATH, as qemu-img, qemu-io and qemu-nbd take it. */
export function nbdUnixUri(path: string, name: string): string {
  return `nbd+unix:///${uriPart(name)}?socket=${uriPart(path)}`;
}

/** Leaves the usual path characters alone (QEMU reads them literally) and escapes the rest. */
function uriPart(s: string): string {
  return s.replace(/[^A-Za-z0-9/._~+-]/g, (c) => encodeURIComponent(c));
}

/** QEMU `-blockdev`/`blockdev-add` options for this export over a unix socket. */
export function nbdBlockdev(path: string, name: string, nodeName: string): Record<string, unknown> {
  return { driver: 'nbd', server: { type: 'unix', path }, export: name, 'node-name': nodeName, 'read-only': true };
}
