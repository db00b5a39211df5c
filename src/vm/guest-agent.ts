/**
 * A client for the QEMU guest agent (qemu-ga, in the guest) over the host end of its
 * virtio-serial channel (VmSpec.guestAgent: a unix socket QEMU listens on).
 *
 * The protocol is QMP's JSON without the greeting: one command `{execute, arguments}` at a time,
 * one reply `{return}` or `{error: {class, desc}}` each, no ids. A session may start in the middle
 * of an old one (a reply nobody read, half a command in the agent's parser), so it opens with
 * `guest-sync-delimited`: we send 0xFF (the agent drops any partial command), then the sync with
 * a random id; the agent answers 0xFF followed by `{"return": id}`, and everything before that
 * is discarded. Nothing answers when no agent runs in the guest (QEMU still accepts the
 * connection): the sync then times out, which is how callers tell "no agent".
 */
import { connect, type Socket } from 'node:net';
import { randomInt } from 'node:crypto';
import { QemuError, TimeoutError } from '../util/errors.js';

export interface AgentFstrimResult {
  paths: Array<{ path: string; trimmed?: number; minimum?: number; error?: string }>;
}

export interface AgentExecStatus {
  exited: boolean;
  exitcode?: number;
  signal?: number;
  'out-data'?: string;
  'err-data'?: string;
}

/** Unread bytes a guest may queue up: more is hostile (the guest runs untrusted code). */
const MAX_UNREAD = 4 << 20;

export class GuestAgent {
  private buf: Buffer = Buffer.alloc(0);
  private closed = false;
  /** A command timed out: its late reply may still come, so the next command syncs first. */
  private desynced = false;
  private waiter: (() => void) | null = null;
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
  ) {
    socket.on('data', (b: Buffer) => {
      this.buf = this.buf.length ? Buffer.concat([this.buf, b]) : b;
      if (this.buf.length > MAX_UNREAD) {
        this.buf = Buffer.alloc(0);
        socket.destroy(); // 'close' ends the session: whoever waits gets "closed"
      }
      this.waiter?.();
    });
    socket.on('error', () => undefined);
    socket.on('close', () => {
      this.closed = true;
      this.waiter?.();
    });
  }

  /**
   * Connects and synchronizes. TimeoutError when no agent answers within timeoutMs (no qemu-ga
   * in the guest, or the guest is not running); QemuError when the socket cannot be reached.
   */
  static async connect(path: string, options: { timeoutMs?: number } = {}): Promise<GuestAgent> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      s.once('error', (err) =>
        reject(new QemuError(`cannot reach the guest agent channel ${path}: ${err.message}`, { path })),
      );
      s.once('connect', () => resolve(s));
    });
    const agent = new GuestAgent(socket, path);
    try {
      await agent.sync(options.timeoutMs ?? 5000);
      return agent;
    } catch (err) {
      agent.destroy();
      throw err;
    }
  }

  /** Like connect(), but undefined when no agent answers (or there is no channel). */
  static async tryConnect(path: string | undefined, timeoutMs = 5000): Promise<GuestAgent | undefined> {
    if (!path) return undefined;
    return GuestAgent.connect(path, { timeoutMs }).catch(() => undefined);
  }

  private async sync(timeoutMs: number): Promise<void> {
    const id = randomInt(1, 2 ** 31);
    this.buf = Buffer.alloc(0);
    this.socket.write(Buffer.from([0xff]));
    this.socket.write(JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } }) + '\n');
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const ff = this.buf.indexOf(0xff);
      if (ff >= 0) {
        const nl = this.buf.indexOf(0x0a, ff);
        if (nl >= 0) {
          const line = this.buf.subarray(ff + 1, nl).toString('utf8');
          this.buf = this.buf.subarray(nl + 1);
          const reply = parse(line);
          if (reply && reply.return === id) return;
          continue; // an older sync's answer
        }
      }
      await this.wait(deadline, `no guest agent answered on ${this.path} within ${timeoutMs} ms`);
    }
  }

  /** Runs one command; its `return` value. QemuError with the agent's message on an error reply. */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: { timeoutMs?: number } = {},
  ): Promise<T> {
    const run = this.queue.then(() => this.executeNow<T>(command, args, options.timeoutMs ?? 30_000));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async executeNow<T>(
    command: string,
    args: Record<string, unknown> | undefined,
    timeoutMs: number,
  ): Promise<T> {
    if (this.closed) throw new QemuError('the guest agent channel is closed');
    if (this.desynced) {
      await this.sync(5000);
      this.desynced = false;
    }
    this.socket.write(JSON.stringify(args ? { execute: command, arguments: args } : { execute: command }) + '\n');
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const nl = this.buf.indexOf(0x0a);
      if (nl >= 0) {
        const line = this.buf.subarray(0, nl).toString('utf8').trim();
        this.buf = this.buf.subarray(nl + 1);
        if (line === '') continue;
        const reply = parse(line);
        if (!reply) throw new QemuError(`the guest agent sent something that is not JSON: ${line.slice(0, 200)}`);
        if (reply.error) {
          const e = reply.error as { class?: string; desc?: string };
          throw new QemuError(`guest agent ${command}: ${e.desc ?? e.class ?? 'error'}`, {
            command,
            errorClass: e.class ?? '',
          });
        }
        return reply.return as T;
      }
      await this.wait(deadline, `the guest agent did not answer ${command} within ${timeoutMs} ms`).catch(
        (err: unknown) => {
          this.desynced = true;
          throw err;
        },
      );
    }
  }

  private wait(deadline: number, message: string): Promise<void> {
    if (this.closed) return Promise.reject(new QemuError('the guest agent channel closed'));
    const left = deadline - Date.now();
    if (left <= 0) return Promise.reject(new TimeoutError(message, { path: this.path }));
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = null;
        reject(new TimeoutError(message, { path: this.path }));
      }, left);
      this.waiter = () => {
        clearTimeout(timer);
        this.waiter = null;
        resolve();
      };
    });
  }

  /** Trims every mounted file system that supports it (guest-fstrim). */
  fstrim(timeoutMs = 600_000): Promise<AgentFstrimResult> {
    return this.execute<AgentFstrimResult>('guest-fstrim', undefined, { timeoutMs });
  }

  /** Freezes every mounted file system (syncs first); the number frozen. */
  freeze(timeoutMs = 120_000): Promise<number> {
    return this.execute<number>('guest-fsfreeze-freeze', undefined, { timeoutMs });
  }

  /** Thaws them; the number thawed. */
  thaw(timeoutMs = 60_000): Promise<number> {
    return this.execute<number>('guest-fsfreeze-thaw', undefined, { timeoutMs });
  }

  fsfreezeStatus(): Promise<'thawed' | 'frozen'> {
    return this.execute<'thawed' | 'frozen'>('guest-fsfreeze-status');
  }

  /** Runs `/bin/sh -c script` in the guest and waits for it; its exit code and output. */
  async shell(script: string, timeoutMs = 120_000): Promise<{ status: number; output: string }> {
    const { pid } = await this.execute<{ pid: number }>('guest-exec', {
      path: '/bin/sh',
      arg: ['-c', script],
      'capture-output': true,
    });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const s = await this.execute<AgentExecStatus>('guest-exec-status', { pid });
      if (s.exited) {
        const out = Buffer.from(s['out-data'] ?? '', 'base64').toString('utf8');
        const err = Buffer.from(s['err-data'] ?? '', 'base64').toString('utf8');
        return { status: s.exitcode ?? (s.signal ? 128 + s.signal : -1), output: out + err };
      }
      if (Date.now() > deadline) throw new TimeoutError(`guest command did not finish within ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  close(): void {
    this.destroy();
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }
}

function parse(line: string): { return?: unknown; error?: unknown } | undefined {
  try {
    const v = JSON.parse(line) as unknown;
    return typeof v === 'object' && v !== null ? v : undefined;
  } catch {
    return undefined;
  }
}
