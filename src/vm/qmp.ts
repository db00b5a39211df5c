/**
 * A small typed client for QMP, QEMU's JSON control protocol, over a unix socket.
 *
 * Why our own: no maintained npm library exists (the one `qemu-qmp` package is proprietary and
 * had a single release), and the protocol is tiny: one JSON object per line; the server greets,
 * we send `qmp_capabilities`, then commands `{execute, arguments, id}` get `{return, id}` or
 * `{error: {class, desc}, id}`; asynchronous `{event, data, timestamp}` messages may arrive at
 * any time, interleaved with replies.
 */
import { connect, type Socket } from 'node:net';
import { EventEmitter } from 'node:events';
import { setTimeout as sleep } from 'node:timers/promises';
import { QemuError, TimeoutError } from '../util/errors.js';

export interface QmpVersion {
  qemu: { major: number; minor: number; micro: number };
  package: string;
}

export interface QmpGreeting {
  QMP: { version: QmpVersion; capabilities: string[] };
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpConnectOptions {
  /** Give up after this long (the socket may not exist yet while QEMU starts). Default 10 s. */
  timeoutMs?: number;
  /** Pause between connection attempts. Default 25 ms. */
  retryMs?: number;
  /** Stop retrying at once when this aborts (e.g. the QEMU process exited); its reason is thrown. */
  signal?: AbortSignal;
}

export interface QmpExecuteOptions {
  /** Default 30 s. */
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  timer: NodeJS.Timeout;
}

type QmpEvents = {
  event: [QmpEvent];
  close: [];
};

/** One connected, negotiated QMP session. Emits 'event' for every QMP event and 'close' once. */
export class QmpClient extends EventEmitter<QmpEvents> {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private isClosed = false;
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: Error) => void } | null = null;
  private greetingValue: QmpGreeting | null = null;

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
  ) {
    super();
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.onData(chunk));
    socket.on('error', () => undefined); // 'close' follows; pending commands are failed there
    socket.on('close', () => this.onClose());
  }

  /**
   * Connects to QEMU's QMP socket, retrying until it appears or the deadline passes, reads the
   * greeting and leaves capabilities negotiation mode.
   */
  static async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    const retryMs = options.retryMs ?? 25;
    const deadline = Date.now() + timeoutMs;
    let lastError: unknown;
    for (;;) {
      options.signal?.throwIfAborted();
      try {
        const socket = await openSocket(path);
        const client = new QmpClient(socket, path);
        try {
          await client.readGreeting(Math.max(1000, deadline - Date.now()));
          await client.execute('qmp_capabilities', undefined, { timeoutMs: 5000 });
          return client;
        } catch (err) {
          client.destroy();
          throw err;
        }
      } catch (err) {
        lastError = err;
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw err;
      }
      if (Date.now() + retryMs > deadline) {
        throw new TimeoutError(`QMP socket ${path} did not answer within ${timeoutMs} ms`, {
          path,
          lastError: String(lastError),
        });
      }
      await sleep(retryMs, undefined, options.signal ? { signal: options.signal } : undefined).catch(() => undefined);
    }
  }

  /** The server's greeting: QEMU version and capabilities. */
  get greeting(): QmpGreeting {
    if (!this.greetingValue) throw new QemuError('QMP greeting not received yet');
    return this.greetingValue;
  }

  get closed(): boolean {
    return this.isClosed;
  }

  /**
   * Runs one command. Resolves with its `return` value; rejects with QemuError carrying QMP's
   * error class and description, TimeoutError, or QemuError if the connection closes first.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, options: QmpExecuteOptions = {}): Promise<T> {
    if (this.isClosed) {
      return Promise.reject(new QemuError(`QMP connection closed; cannot run ${command}`, { command }));
    }
    const id = `c${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? 30_000;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new TimeoutError(`QMP command ${command} got no answer within ${timeoutMs} ms`, { command }));
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const message: Record<string, unknown> = { execute: command, id };
      if (args !== undefined) message['arguments'] = args;
      this.socket.write(JSON.stringify(message) + '\n');
    });
  }

  /**
   * Resolves with the next event that matches. Call it *before* triggering what causes the
   * event, or the event may pass unseen.
   */
  waitForEvent(
    match: string | ((event: QmpEvent) => boolean),
    options: { timeoutMs?: number } = {},
  ): Promise<QmpEvent> {
    const test = typeof match === 'string' ? (e: QmpEvent) => e.event === match : match;
    const timeoutMs = options.timeoutMs ?? 30_000;
    return new Promise<QmpEvent>((resolve, reject) => {
      const cleanup = (): void => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (e: QmpEvent): void => {
        if (!test(e)) return;
        cleanup();
        resolve(e);
      };
      const onClose = (): void => {
        cleanup();
        reject(new QemuError('QMP connection closed while waiting for an event'));
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new TimeoutError(`no matching QMP event within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.isClosed) {
        onClose();
        return;
      }
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Closes the connection (QEMU keeps running). */
  async close(): Promise<void> {
    if (this.isClosed) return;
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      this.socket.end();
      setTimeout(() => this.socket.destroy(), 500).unref();
    });
  }

  /** Drops the connection at once. */
  destroy(): void {
    this.socket.destroy();
  }

  private readGreeting(timeoutMs: number): Promise<QmpGreeting> {
    if (this.greetingValue) return Promise.resolve(this.greetingValue);
    return new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.greetingWaiter = null;
        reject(new TimeoutError(`no QMP greeting on ${this.path} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.greetingWaiter = {
        resolve: (g) => {
          clearTimeout(timer);
          resolve(g);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.onLine(line);
    }
  }

  private onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      // QMP never sends partial JSON per line; a garbled line is dropped rather than fatal.
      return;
    }
    if ('QMP' in msg) {
      this.greetingValue = msg as unknown as QmpGreeting;
      this.greetingWaiter?.resolve(this.greetingValue);
      this.greetingWaiter = null;
      return;
    }
    if (typeof msg['event'] === 'string') {
      this.emit('event', msg as unknown as QmpEvent);
      return;
    }
    const id = typeof msg['id'] === 'string' ? msg['id'] : undefined;
    if (id === undefined) return;
    const p = this.pending.get(id);
    if (!p) return; // answer after a timeout
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ('error' in msg) {
      const e = (msg['error'] ?? {}) as { class?: string; desc?: string };
      p.reject(
        new QemuError(`QMP ${p.command} failed: ${e.desc ?? 'unknown error'}`, {
          command: p.command,
          qmpClass: e.class ?? 'unknown',
          qmpDesc: e.desc ?? '',
        }),
      );
    } else {
      p.resolve(msg['return']);
    }
  }

  private onClose(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new QemuError(`QMP connection closed before ${p.command} answered`, { command: p.command }));
      this.pending.delete(id);
    }
    this.greetingWaiter?.reject(new QemuError(`QMP socket ${this.path} closed before the greeting`));
    this.greetingWaiter = null;
    this.emit('close');
  }
}

function openSocket(path: string): Promise<Socket> {
  return new Promise<Socket>((resolve, reject) => {
    const socket = connect(path);
    const onError = (err: Error): void => {
      socket.destroy();
      reject(err);
    };
    socket.once('error', onError);
    socket.once('connect', () => {
      socket.off('error', onError);
      resolve(socket);
    });
  });
}
